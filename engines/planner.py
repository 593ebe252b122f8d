"""Device-memory planner: will a model's engines fit a card at the profile's largest shapes?

Per component c, at the profile's precision and the largest shapes of its range (the U-Net at its
largest prompt: the profile's prompt_chunks, else the export's default of 3 chunks, 231 tokens):

    weights(c)     = sum over parameters of bytes per parameter: fp32 4, fp16 2; int8 and fp8: 1 for
                     the weights of Conv/Linear layers outside NVIDIA's SDXL exclusion list, 2 (fp16)
                     for every other parameter; int8-wo (weight-only INT8): 1 for the weights of
                     Linear layers (the GEMMs) outside that list, 2 for every other parameter. From
                     an artifacts folder: the bytes of its ONNX files.
    activations(c) = peak bytes of live intermediate tensors of one forward pass, traced on the meta
                     device (engines/activations.py): eager execution order, every tensor freed after
                     its last use, fused attention for heads up to 128 wide.
    io(c)          = bytes of the component's inputs and outputs at the largest shapes (the runtime
                     keeps these device buffers between calls).

and for the whole pipeline:

    overhead       = RUNTIME_OVERHEAD (CUDA context, TensorRT runtime and kernels: 512 MiB assumed)
    resident peak  = overhead + sum_c (weights(c) + io(c)) + max_c activations(c)
                     (all engines loaded; one activation buffer shared by the components, which run
                     one after another: what TensorRTBackend does)
    one at a time  = overhead + max_c (weights(c) + io(c) + activations(c))
    build peak     = overhead + max_c (weights(c) + activations(c)) + workspace cap (rough: tactics are
                     timed with scratch memory up to the cap, one component at a time)
    usable         = gpu.memory - gpu.reserved (display, ECC, OS: from the profile)
    fits           = peak (resident by default, or the profile's residency) <= usable; margin = usable - peak

With weight streaming (profile build.weight_streaming) a component c keeps kept(c) <= weights(c) bytes of
its weights on the device and streams the rest from host memory at every call; a streaming component also
needs scratch(c) = 2 x its largest weight tensor (assumed: one tensor in use and the next one arriving):

    resident peak  = overhead + sum_c (kept(c) + io(c)) + max_c (activations(c) + scratch(c))
    one at a time  = overhead + max_c (kept(c) + io(c) + activations(c) + scratch(c))

The budgets are the largest that fit with streaming_headroom() to spare (256 MiB, or 5% of a small
card's usable memory) (solve_budgets): resident, the components run once per image stream first
(their cost is paid once per image), the U-Net last (its cost, weights(unet) - kept(unet), is paid at
every denoising step); one at a time, each component on its own. A budget from the profile (runtime.weight_streaming_budget_gib) fixes kept(unet).

With tiled VAE decode (vae.tile) the decoder is planned at the tile's size: its activations, I/O and engine
are those of one tile (GpuProfile.shape_range).

What this leaves out, and why it is still a fair verdict: TensorRT fuses element-wise layers into
their producers, so its activation memory is usually below the eager trace (the estimate errs
high); tactic scratch at run time is bounded by the workspace cap but usually far smaller, so it is
not added to the run-time peaks; the sampler's own host-side arrays do not live on the device
(except on Jetson, whose reserve covers them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engines.profile import GIB, GpuProfile
from exporter.specs import DEFAULT_PROMPT_CHUNKS, NUMPY_DTYPES, ComponentSpec, ShapeRange, specs_from_configs

MIB = 1 << 20
RUNTIME_OVERHEAD_BYTES = 512 * MIB
STREAMING_HEADROOM_BYTES = 256 * MIB  # what a solved weight-streaming budget leaves free (estimate error),
STREAMING_HEADROOM_FRACTION = 0.05    # or this share of the usable memory where that is less (small cards)
BYTES_PER_PARAM = {"fp32": 4, "fp16": 2}
WEIGHT_ONLY = ("int8-wo",)  # 1-byte GEMM (Linear) weights only; int8/fp8 also quantize Conv weights
# NVIDIA's SDXL INT8 recipe keeps these layers out of quantization (TensorRT diffusion demo).
INT8_EXCLUDED = ("time_emb_proj", "time_embedding", "conv_in", "conv_out", "conv_shortcut", "add_embedding",
                 "norm_out", "proj_out")
# The parts of the VAE each VAE component runs.
VAE_PARTS = {"vae_decoder": ("decoder", "post_quant_conv"), "vae_encoder": ("encoder", "quant_conv")}


@dataclass
class ComponentMemory:
    component: str
    precision: str
    parameters: int
    weights_bytes: int
    weights_from: str  # "parameters" or "onnx files"
    activations_bytes: int | None
    io_bytes: int
    max_shapes: dict[str, tuple[int, ...]]
    peak_op: str = ""
    note: str = ""
    largest_weight_bytes: int = 0  # the largest single weight tensor (weight streaming's scratch)
    kept_bytes: int | None = None  # weight streaming: weights kept on the device (None: all of them)

    @property
    def streams(self) -> bool:
        return self.kept_bytes is not None and self.kept_bytes < self.weights_bytes

    @property
    def device_weights_bytes(self) -> int:
        return self.weights_bytes if self.kept_bytes is None else min(self.kept_bytes, self.weights_bytes)

    @property
    def streamed_bytes(self) -> int:
        """Bytes of weights streamed from host memory at every call."""
        return self.weights_bytes - self.device_weights_bytes

    @property
    def scratch_bytes(self) -> int:
        return 2 * self.largest_weight_bytes if self.streams else 0

    @property
    def run_bytes(self) -> int:
        """Activations and streaming scratch: the part of the peak shared with the other components."""
        return (self.activations_bytes or 0) + self.scratch_bytes

    @property
    def total_bytes(self) -> int:
        return self.device_weights_bytes + self.run_bytes + self.io_bytes

    def to_json(self) -> dict[str, Any]:
        return {"precision": self.precision, "parameters": self.parameters, "weights_bytes": self.weights_bytes,
                "weights_from": self.weights_from, "activations_bytes": self.activations_bytes,
                "io_bytes": self.io_bytes, "total_bytes": self.total_bytes,
                "max_shapes": {k: list(v) for k, v in self.max_shapes.items()}, "activation_peak_at": self.peak_op,
                **({"weight_streaming": {"budget_bytes": self.device_weights_bytes, "streamed_bytes": self.streamed_bytes,
                                         "scratch_bytes": self.scratch_bytes}} if self.kept_bytes is not None else {}),
                **({"note": self.note} if self.note else {})}


@dataclass
class MemoryPlan:
    model: str
    profile: GpuProfile
    mode: str  # resident | sequential: which peak the verdict uses
    components: dict[str, ComponentMemory] = field(default_factory=dict)
    overhead_bytes: int = RUNTIME_OVERHEAD_BYTES

    @property
    def usable_bytes(self) -> int:
        return self.profile.gpu.usable_bytes

    @property
    def workspace_bytes(self) -> int:
        return int(self.profile.build.workspace_gib * GIB)

    @property
    def resident_peak(self) -> int:
        c = self.components.values()
        return (self.overhead_bytes + sum(m.device_weights_bytes + m.io_bytes for m in c)
                + max((m.run_bytes for m in c), default=0))

    @property
    def sequential_peak(self) -> int:
        return self.overhead_bytes + max((m.total_bytes for m in self.components.values()), default=0)

    @property
    def build_peak(self) -> int:
        return (self.overhead_bytes + self.workspace_bytes
                + max((m.weights_bytes + (m.activations_bytes or 0) for m in self.components.values()), default=0))

    @property
    def peak(self) -> int:
        return self.resident_peak if self.mode == "resident" else self.sequential_peak

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable_bytes

    @property
    def margin_bytes(self) -> int:
        return self.usable_bytes - self.peak

    @property
    def streamed_per_step_bytes(self) -> int:
        """U-Net weights streamed from host memory at every denoising step (one U-Net call per step)."""
        u = self.components.get("unet")
        return u.streamed_bytes if u else 0

    @property
    def streamed_per_image_bytes(self) -> int:
        """Weights of the components run once per image streamed at their call."""
        return sum(m.streamed_bytes for n, m in self.components.items() if n != "unet")

    @property
    def complete(self) -> bool:
        """False when some component's activations could not be estimated (then peaks are lower bounds)."""
        return all(m.activations_bytes is not None for m in self.components.values())

    def verdict(self) -> dict[str, Any]:
        return {"fits": self.fits, "mode": self.mode, "peak_bytes": self.peak, "usable_bytes": self.usable_bytes,
                "margin_bytes": self.margin_bytes, "margin_gib": round(self.margin_bytes / GIB, 2),
                "margin_percent": round(100.0 * self.margin_bytes / self.usable_bytes, 1),
                "complete": self.complete}

    def to_json(self) -> dict[str, Any]:
        p = self.profile
        streaming = None
        if p.build.weight_streaming:
            streaming = {"streamed_per_step_bytes": self.streamed_per_step_bytes,
                         "streamed_per_image_bytes": self.streamed_per_image_bytes,
                         "budgets_bytes": {k: m.device_weights_bytes for k, m in self.components.items()}}
        return {"model": self.model, "profile": p.name, "vae_tile": p.vae.tile or None, "weight_streaming": streaming,
                "gpu": {"compute_capability": p.gpu.compute_capability, "memory_gib": p.gpu.memory_gib,
                        "reserved_gib": p.gpu.reserved_gib, "usable_bytes": self.usable_bytes},
                "shapes": {"batch": list(p.shapes.batch), "height": list(p.shapes.height),
                           "width": list(p.shapes.width), "guidance": p.shapes.guidance},
                "components": {k: v.to_json() for k, v in self.components.items()},
                "overhead_bytes": self.overhead_bytes, "workspace_bytes": self.workspace_bytes,
                "resident_peak_bytes": self.resident_peak, "sequential_peak_bytes": self.sequential_peak,
                "build_peak_bytes": self.build_peak, **self.verdict()}


# ----- the parts ------------------------------------------------------------------------------

def _weight_bytes(module: Any, component: str, precision: str) -> tuple[int, int]:
    """(parameters, bytes) of the parameters `component` runs, on the meta module."""
    import torch

    parts = VAE_PARTS.get(component)
    named = [(n, p) for n, p in module.named_parameters() if parts is None or n.split(".")[0] in parts]
    params = sum(p.numel() for _, p in named)
    if precision in BYTES_PER_PARAM:
        return params, params * BYTES_PER_PARAM[precision]
    quantizable = set()
    layers = (torch.nn.Linear,) if precision in WEIGHT_ONLY else (torch.nn.Linear, torch.nn.Conv2d)
    for name, m in module.named_modules():
        if isinstance(m, layers) and not any(x in name for x in INT8_EXCLUDED):
            quantizable.add(f"{name}.weight")
    return params, sum(p.numel() * (1 if n in quantizable else 2) for n, p in named)


_CACHE: dict[tuple[Any, ...], tuple[int, int, Any]] = {}


def measure_component(source: Any, spec: ComponentSpec, precision: str, batch: int, height: int,
                      width: int, chunks: int = 1) -> tuple[int, int, Any]:
    """(parameters, weight bytes, ActivationTrace) for one component at one shape, cached per process."""
    key = (source.ref, spec.name, precision, batch, height, width, chunks)
    if key not in _CACHE:
        import torch

        from engines.activations import meta_inputs, trace_activations
        from exporter.wrappers import wrap

        module = source.build(spec.module, device="meta")
        params, wbytes = _weight_bytes(module, spec.name, precision)
        dtype = torch.float32 if precision == "fp32" else torch.float16  # int8 graphs compute in fp16 between Q/DQ
        wrapper = wrap(spec, module).to(dtype)
        trace = trace_activations(wrapper, meta_inputs(spec, batch, height, width, dtype, chunks))
        _CACHE[key] = (params, wbytes, trace)
    return _CACHE[key]


def io_bytes(spec: ComponentSpec, batch: int, height: int, width: int, chunks: int = 1) -> int:
    total = 0
    for tensors, shapes in ((spec.inputs, spec.input_shapes(batch, height, width, chunks)),
                            (spec.outputs, spec.output_shapes(batch, height, width, chunks))):
        for t in tensors:
            n = 1
            for d in shapes[t.name]:
                n *= d
            total += n * NUMPY_DTYPES[t.dtype]().itemsize
    return total


def planned_chunks(spec: ComponentSpec, rng: ShapeRange) -> int:
    """The prompt chunks the plan sizes a component at: the profile's largest, or, where the profile
    leaves the U-Net's sequence range to the export, the export's default largest (DEFAULT_PROMPT_CHUNKS,
    231 tokens); 1 for a graph without a sequence axis."""
    if not spec.has_sequence:
        return 1
    return rng.prompt_chunks[2] if rng.prompt_chunks else DEFAULT_PROMPT_CHUNKS


def check_plan_sizes(specs: dict[str, ComponentSpec], profile: GpuProfile, components: list[str] | None = None) -> None:
    """The profile's smallest and largest sizes suit every component's size multiple (before any tracing)."""
    for name in components or profile.components():
        rng = profile.shape_range(specs[name].kind)
        for h, w in ((rng.height[0], rng.width[0]), (rng.height[2], rng.width[2])):
            specs[name].check_size(h, w)


def largest_weight_bytes(source: Any, spec: ComponentSpec, precision: str) -> int:
    """Bytes of the largest weight tensor `spec`'s component runs (fp32 4 per value, else 2: an upper bound
    for int8), on the meta module; cached per process."""
    key = ("largest", source.ref, spec.name, precision)
    if key not in _CACHE:
        module = source.build(spec.module, device="meta")
        parts = VAE_PARTS.get(spec.name)
        numel = max((p.numel() for n, p in module.named_parameters() if parts is None or n.split(".")[0] in parts),
                    default=0)
        _CACHE[key] = (numel * (4 if precision == "fp32" else 2), 0, None)
    return _CACHE[key][0]


def streaming_headroom(usable_bytes: int) -> int:
    return min(STREAMING_HEADROOM_BYTES, int(STREAMING_HEADROOM_FRACTION * usable_bytes))


def solve_budgets(plan: MemoryPlan, unet_budget: int | None = None) -> None:
    """Weight streaming: set each component's kept bytes to the largest that fits the card with
    streaming_headroom() free (see the module docstring). Components that fit keep all their weights
    (kept = weights); where even budget 0 does not fit, the budget stays 0 and the plan does not fit."""
    target = plan.usable_bytes - streaming_headroom(plan.usable_bytes)
    comps = plan.components
    for m in comps.values():
        m.kept_bytes = m.weights_bytes
    if unet_budget is not None and "unet" in comps:
        comps["unet"].kept_bytes = min(unet_budget, comps["unet"].weights_bytes)
    free = [n for n in sorted(comps, key=lambda n: -comps[n].weights_bytes) if n != "unet"]
    if unet_budget is None and "unet" in comps:
        free.append("unet")
    if plan.mode == "sequential":
        for n in free:
            m = comps[n]
            if plan.overhead_bytes + m.total_bytes <= target:
                continue
            m.kept_bytes = 0
            room = target - (plan.overhead_bytes + m.total_bytes)
            m.kept_bytes = min(m.weights_bytes, max(0, room))
        return
    for n in free:
        if plan.resident_peak <= target:
            break
        m = comps[n]
        m.kept_bytes = 0
        room = target - plan.resident_peak
        m.kept_bytes = min(m.weights_bytes, max(0, room))


def plan_memory(source: Any, profile: GpuProfile, components: list[str] | None = None, mode: str | None = None,
                specs: dict[str, ComponentSpec] | None = None, precisions: dict[str, str] | None = None,
                weights_override: dict[str, int] | None = None) -> MemoryPlan:
    """The memory plan of `source` (a ModelSource) on `profile`'s card. `specs`, `precisions` and
    `weights_override` (bytes of ONNX files) come from an artifacts folder when planning a build."""
    specs = specs or specs_from_configs(source.configs)
    check_plan_sizes(specs, profile, components)
    plan = MemoryPlan(model=source.ref, profile=profile, mode=mode or profile.runtime.residency)
    for name in components or profile.components():
        spec = specs[name]
        precision = (precisions or {}).get(name) or profile.precision_for(name)
        rng = profile.shape_range(spec.kind)
        b, h, w, n = rng.batch[2], rng.height[2], rng.width[2], planned_chunks(spec, rng)
        params, wbytes, trace = measure_component(source, spec, precision, b, h, w, n)
        note = ""
        if trace.unfused_attention_calls:
            note = (f"{trace.unfused_attention_calls} attention call(s) with heads wider than 128 counted "
                    "with their full score matrices")
        weights_from = "parameters"
        if weights_override and name in weights_override:
            wbytes, weights_from = weights_override[name], "onnx files"
        plan.components[name] = ComponentMemory(
            component=name, precision=precision, parameters=params, weights_bytes=wbytes, weights_from=weights_from,
            activations_bytes=trace.peak_bytes, io_bytes=io_bytes(spec, b, h, w, n),
            max_shapes=spec.input_shapes(b, h, w, n), peak_op=trace.peak_op, note=note,
            largest_weight_bytes=largest_weight_bytes(source, spec, precision) if profile.build.weight_streaming else 0)
    if profile.build.weight_streaming:
        budget = profile.runtime.weight_streaming_budget_gib
        solve_budgets(plan, None if budget is None else int(budget * GIB))
    return plan


def weights_only_plan(model: str, profile: GpuProfile, specs: dict[str, ComponentSpec], precisions: dict[str, str],
                      weights: dict[str, int], parameters: dict[str, int], reason: str) -> MemoryPlan:
    """A plan without activations (torch missing, or the source model cannot be resolved):
    its peaks are lower bounds and `complete` is False."""
    plan = MemoryPlan(model=model, profile=profile, mode=profile.runtime.residency)
    for name, spec in specs.items():
        rng = profile.shape_range(spec.kind)
        b, h, w, n = rng.batch[2], rng.height[2], rng.width[2], planned_chunks(spec, rng)
        plan.components[name] = ComponentMemory(
            component=name, precision=precisions[name], parameters=parameters.get(name, 0),
            weights_bytes=weights[name], weights_from="onnx files", activations_bytes=None,
            io_bytes=io_bytes(spec, b, h, w, n), max_shapes=spec.input_shapes(b, h, w, n), note=reason)
    return plan
