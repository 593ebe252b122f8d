"""Latency and memory of a backend: each pipeline component on its own (one U-Net step at the CFG
batch, the text encoders, the VAE decode) and the whole text-to-image loop of sampler/loop.py.

Warm-up calls are run and discarded; the timed calls give median and p90 (numpy's linear
percentile, so with few runs p90 lies between the two slowest). Memory is the process's peak RSS
for CPU backends (koala_core/meter.py) and device memory for GPU backends. No torch here: the torch
backend imports it itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from exporter.specs import CACHE_COMPONENTS, NUMPY_DTYPES, VARIANT_COMPONENTS
from koala_core.errors import UsageError
from koala_core.machine import machine_facts
from koala_core.meter import Meter, process_peak_rss_mb
from sampler.api import Pipeline
from sampler.loop import SAMPLER_COMPONENTS, Plan, PipelineAssets, Sampler, Timings

DEFAULT_PROMPT = "a koala climbing a eucalyptus tree at sunset, photo"


# Timed alone besides the sampler's four: the other U-Net graphs one step may run (a cached step's
# shallow branch and refresh, a ControlNet step's two networks), each at the CFG batch, and the encoder
# of img2img. The end-to-end loop stays text-to-image.
U_NET_STEP_COMPONENTS = ("unet", *CACHE_COMPONENTS, *VARIANT_COMPONENTS)
BENCH_COMPONENTS = (*SAMPLER_COMPONENTS, "vae_encoder", *CACHE_COMPONENTS, *VARIANT_COMPONENTS)


@dataclass(frozen=True)
class BenchOptions:
    """What to measure; None means the model's default (the artifacts' "sampler" entry)."""

    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    batch: int = 1
    warmup: int = 1
    runs: int = 3
    components: tuple[str, ...] = SAMPLER_COMPONENTS
    end_to_end: bool = True
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    keep_outputs: bool = False  # keep each component's last outputs and the last end-to-end images (side by side)
    vae_tile: int | None = None  # decode in tiles of this many pixels (sampler/vae_tiling.py); None: the engine's own, else untiled
    scheduler: str | None = None  # a sampler.schedulers name for the end-to-end runs; None: the model's own
    cache_interval: int = 1  # feature caching end to end (sampler/feature_cache.py); 1: off
    cache_branch: int | None = None

    def check(self) -> None:
        if self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0 (got {self.warmup})")
        if self.runs < 1:
            raise UsageError(f"--runs must be >= 1 (got {self.runs})")
        bad = [c for c in self.components if c not in BENCH_COMPONENTS]
        if bad:
            raise UsageError(f"cannot bench {', '.join(bad)}: the components it times are {', '.join(BENCH_COMPONENTS)}")
        from exporter.cache_branch import check_interval

        check_interval(self.cache_interval)
        if not self.components and not self.end_to_end:
            raise UsageError("nothing to measure: no components and --no-end-to-end")


def latency_stats(seconds: list[float]) -> dict[str, Any]:
    """median, p90, mean, min, max (seconds), the number of timed calls and the calls themselves."""
    a = np.asarray(seconds, dtype=np.float64)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max()), "runs": int(a.size), "calls": [float(x) for x in a]}


# ----- memory -------------------------------------------------------------------------------------

class MemoryProbe:
    """Peak memory over stretches of work: RSS on CPU, device memory on a GPU backend.

    - rss: VmHWM of this process over the stretch (the kernel's mark is reset at its start).
    - torch-cuda: torch.cuda.max_memory_allocated over the stretch (tensors only, not the allocator's cache).
    - device: total - free device memory (cudaMemGetInfo) sampled after every call: the whole device,
      other processes and the CUDA context included (TensorRT and ONNX Runtime's CUDA provider allocate
      outside torch, so this is what they have)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._peak = 0
        self._meter: Meter | None = None

    @classmethod
    def for_backend(cls, backend: Any) -> "MemoryProbe":
        name = getattr(backend, "name", "")
        if name == "torch" and str(getattr(backend, "device", "cpu")).startswith("cuda"):
            return cls("torch-cuda")
        on_gpu = name == "tensorrt" or (name == "onnxruntime" and "CUDAExecutionProvider" in _describe(backend))
        if on_gpu:
            try:
                from engines import cuda

                if cuda.available():
                    return cls("device")
            except ImportError:
                pass
        return cls("rss")

    @property
    def what(self) -> str:
        return {"rss": "peak resident set size of the process (VmHWM)",
                "torch-cuda": "torch.cuda.max_memory_allocated",
                "device": "device memory in use (total - free, whole GPU), highest value after a call"}[self.kind]

    def start(self) -> None:
        self._peak = 0
        if self.kind == "rss":
            self._meter = Meter().__enter__()
        elif self.kind == "torch-cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def sample(self) -> None:
        if self.kind == "device":
            from engines import cuda

            free, total = cuda.mem_info()
            self._peak = max(self._peak, total - free)

    def stop(self) -> float:
        """Peak MiB since start()."""
        if self.kind == "rss":
            assert self._meter is not None
            self._meter.__exit__(None, None, None)
            return self._meter.peak_rss_mb
        if self.kind == "torch-cuda":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        self.sample()
        return self._peak / 2**20


def _describe(backend: Any) -> str:
    describe = getattr(backend, "describe", None)
    return describe() if describe is not None else str(getattr(backend, "name", "?"))


# ----- the bench ------------------------------------------------------------------------------------

@dataclass
class BenchResult:
    """Everything measured, as `to_json()` writes it (seconds; MiB)."""

    backend: str
    backend_detail: str
    plan: Plan
    options: BenchOptions
    load_seconds: float
    memory_kind: str
    memory_what: str
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    end_to_end: dict[str, Any] | None = None
    peak_memory_mb: float = 0.0
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # "<component>.<output>" and "images" (keep_outputs)

    @property
    def images_per_minute(self) -> float | None:
        if not self.end_to_end:
            return None
        return 60.0 * self.plan.batch / self.end_to_end["median"]

    def to_json(self) -> dict[str, Any]:
        o, p = self.options, self.plan
        return {"backend": self.backend, "backend_detail": self.backend_detail, "unit": "seconds",
                "height": p.height, "width": p.width, "batch": p.batch, "steps": p.steps, "guidance": p.guidance,
                "scheduler": p.scheduler or "euler",
                "cfg": p.cfg, "warmup": o.warmup, "runs": o.runs, "load_seconds": self.load_seconds,
                "components": self.components, "end_to_end": self.end_to_end,
                "images_per_minute": self.images_per_minute,
                "memory": {"kind": self.memory_kind, "what": self.memory_what, "peak_mb": self.peak_memory_mb},
                "peak_rss_mb": process_peak_rss_mb(), "machine": machine_facts()}

    def csv_rows(self) -> list[dict[str, Any]]:
        """One row per component and one for the whole loop."""
        rows = []
        for name, c in self.components.items():
            rows.append({"stage": name, "batch": c["batch"], **{k: c[k] for k in ("runs", "median", "p90", "mean", "min", "max")},
                         "peak_memory_mb": c["peak_memory_mb"], "memory_kind": self.memory_kind, "images_per_minute": ""})
        if self.end_to_end:
            e = self.end_to_end
            rows.append({"stage": f"end_to_end ({self.plan.steps} steps)", "batch": self.plan.batch,
                         **{k: e[k] for k in ("runs", "median", "p90", "mean", "min", "max")},
                         "peak_memory_mb": e["peak_memory_mb"], "memory_kind": self.memory_kind,
                         "images_per_minute": self.images_per_minute})
        return rows


CSV_FIELDS = ["stage", "batch", "runs", "median", "p90", "mean", "min", "max", "peak_memory_mb", "memory_kind", "images_per_minute"]


def _tiled_decode(sampler: Sampler, tile: int) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The VAE decoder as the sampler runs it with a tile size: every tile of the image, blended."""
    return lambda feeds: {"sample": sampler.decode(feeds["latent_sample"], tile=tile)}


def component_batches(plan: Plan, sampler: Sampler | PipelineAssets) -> dict[str, int]:
    """The batch each component sees in one image request, as the sampler runs it: the text encoders
    encode the prompts in one call (the negative only when one is given: an empty one is zeros, SDXL's
    force_zeros_for_empty_prompt), the U-Net runs the CFG batch (2 x images), the VAE the images."""
    assets = sampler.assets if isinstance(sampler, Sampler) else sampler
    prompts = 2 if plan.encode_negative or (plan.cfg and not assets.force_zeros_for_empty_prompt) else 1
    step = 2 * plan.batch if plan.cfg else plan.batch
    return {"text_encoder": prompts, "text_encoder_2": prompts, **{c: step for c in U_NET_STEP_COMPONENTS},
            "vae_decoder": plan.batch, "vae_encoder": plan.batch}


def run_bench(backend: Any, assets: PipelineAssets, opts: BenchOptions,
              log: Callable[[str], None] = lambda m: None) -> BenchResult:
    """Load, then time each component in isolation and the whole loop through the Sampler."""
    opts.check()
    specs = {**assets.specs, **(getattr(backend, "specs", {}) or {})}
    sampler: Sampler | None = None
    if opts.end_to_end or all(c in specs for c in SAMPLER_COMPONENTS):
        # The end-to-end loop goes the way every image request goes (sampler/api.py).
        pipe = Pipeline(backend, assets, warn=lambda m: log(f"warning: {m}"))
        sampler = pipe.sampler
        [plan] = pipe.plan(pipe.requests(opts.prompt, num_inference_steps=opts.steps, guidance_scale=opts.guidance, seed=opts.seed,
                                         height=opts.height, width=opts.width, num_images_per_prompt=opts.batch, vae_tile=opts.vae_tile,
                                         scheduler=opts.scheduler, cache_interval=opts.cache_interval, cache_branch=opts.cache_branch))
    else:  # components alone from an export of some of them (`export --components unet`): no sampler runs
        plan = components_plan(backend, assets, specs, opts)
    needed = list(dict.fromkeys([*opts.components, *sampler.components(plan)])) if opts.end_to_end and sampler is not None \
        else list(opts.components)
    t0 = time.perf_counter()
    load = getattr(backend, "load", None)
    if load is not None:
        load(needed)
    load_s = time.perf_counter() - t0
    probe = MemoryProbe.for_backend(backend)
    result = BenchResult(backend=getattr(backend, "name", "?"), backend_detail=_describe(backend), plan=plan, options=opts,
                         load_seconds=load_s, memory_kind=probe.kind, memory_what=probe.what)
    log(f"{result.backend_detail}: loaded {', '.join(needed)} in {load_s:.1f} s; "
        f"{plan.width}x{plan.height}, {plan.batch} image(s), warm-up {opts.warmup}, runs {opts.runs}")

    # Each component alone on spec-shaped inputs (the same sizes the sampler feeds), timings kept in a
    # sampler Timings so both phases are summarised alike.
    batches = component_batches(plan, assets)
    alone = Timings()
    for comp in opts.components:
        spec = specs[comp]
        feeds = {k: v.astype(NUMPY_DTYPES[spec.input(k).dtype], copy=False)
                 for k, v in spec.dummy_inputs(batches[comp], plan.height, plan.width, seed=opts.seed).items()}
        tiled = comp == "vae_decoder" and plan.vae_tile is not None and sampler is not None
        call = _tiled_decode(sampler, plan.vae_tile) if tiled else partial(backend.run, comp)  # type: ignore[arg-type]
        probe.start()
        for i in range(opts.warmup):
            t = time.perf_counter()
            call(feeds)
            probe.sample()
            log(f"{comp} (batch {batches[comp]}): warm-up {i + 1}/{opts.warmup} {time.perf_counter() - t:.3f} s")
        for i in range(opts.runs):
            t = time.perf_counter()
            outs = call(feeds)
            alone.add(comp, time.perf_counter() - t)
            if opts.keep_outputs:
                result.outputs.update({f"{comp}.{k}": np.asarray(v) for k, v in outs.items()})
            probe.sample()
            log(f"{comp} (batch {batches[comp]}): run {i + 1}/{opts.runs} {alone.stages[comp][-1]:.3f} s")
        result.components[comp] = {"batch": batches[comp], **latency_stats(alone.stages[comp]), "peak_memory_mb": probe.stop(),
                                   **({"vae_tile": plan.vae_tile, "tiles": sampler.tile_grid(plan).count}  # type: ignore[union-attr]
                                      if tiled else {})}

    if opts.end_to_end and sampler is not None:
        probe.start()
        for i in range(opts.warmup):
            t = pipe.run([plan], output_type="np", progress=False).timings
            probe.sample()
            log(f"end to end ({plan.steps} steps): warm-up {i + 1}/{opts.warmup} {t.total('sample'):.3f} s")
        totals: list[float] = []
        merged = Timings()
        for i in range(opts.runs):
            out = pipe.run([plan], output_type="np", progress=False)
            images, t = out.images, out.timings
            probe.sample()
            if opts.keep_outputs:
                result.outputs["images"] = images
            totals.append(t.total("sample"))
            for stage, v in t.stages.items():
                merged.stages.setdefault(stage, []).extend(v)
            log(f"end to end ({plan.steps} steps): run {i + 1}/{opts.runs} {totals[-1]:.3f} s")
        summary = merged.summary()
        result.end_to_end = {**latency_stats(totals), "steps": plan.steps, "peak_memory_mb": probe.stop(),
                             "images_per_minute": 60.0 * plan.batch / float(np.median(totals)),
                             "stages": {k: latency_stats(merged.stages[k]) for k in SAMPLER_COMPONENTS if merged.stages.get(k)},
                             "overhead_per_step_ms": summary["overhead"]["per_step_ms"]}
    peaks = [c["peak_memory_mb"] for c in result.components.values()]
    if result.end_to_end:
        peaks.append(result.end_to_end["peak_memory_mb"])
    result.peak_memory_mb = max(peaks)
    return result


def components_plan(backend: Any, assets: PipelineAssets, specs: dict[str, Any], opts: BenchOptions) -> Plan:
    """The sizes and batches the sampler would run, for timing components of an export that lacks some
    of the sampler's (the Sampler needs all four; timing one needs only that one): the same defaults
    and the same size and batch checks against each measured component's range, before any call."""
    missing = [c for c in opts.components if c not in specs]
    if missing:
        raise UsageError(f"{assets.origin or 'the backend'} has no {', '.join(missing)} (it holds {', '.join(specs)})")
    if opts.vae_tile is not None:
        raise UsageError("--vae-tile decodes through the sampler, which needs " + ", ".join(SAMPLER_COMPONENTS)
                         + f"; {assets.origin or 'the backend'} has {', '.join(specs)}")
    steps = assets.steps if opts.steps is None else opts.steps
    guidance = assets.guidance if opts.guidance is None else float(opts.guidance)
    if not np.isfinite(guidance) or guidance < 0:
        raise UsageError(f"--guidance must be a finite number >= 0 (got {guidance})")
    height = assets.height if opts.height is None else opts.height
    width = assets.width if opts.width is None else opts.width
    plan = Plan(opts.prompt, "", steps, guidance, opts.seed, height, width, opts.batch, np.zeros((0,), np.float32))
    batches = component_batches(plan, assets)
    for comp in opts.components:
        spec = specs[comp]
        if height <= 0 or width <= 0 or height % spec.size_multiple or width % spec.size_multiple:
            raise UsageError(f"{comp}: --height and --width must be positive multiples of {spec.size_multiple} (got {height}x{width})")
        r = assets.shape_ranges.get(comp)
        probe = getattr(backend, "shape_range", None)
        if probe is not None:
            try:
                r = probe(comp) or r
            except (KeyError, UsageError):
                pass
        if r is not None:
            r.check(comp, spec.spatial, height, width, batch=batches[comp], batch_what=f"batch {batches[comp]}")
    return plan


# ----- side by side -----------------------------------------------------------------------------------

# The precisions a backend can be asked for in `--backend NAME:PRECISION` (onnxruntime and tensorrt
# run the precision their artifacts / engines were made with).
ENTRY_PRECISIONS = {"openvino": ("auto", "fp32", "bf16"), "torch": ("fp32", "bf16")}


@dataclass(frozen=True)
class BackendEntry:
    """One backend of a side-by-side run: `name`, `name:precision` (openvino's --cpu-precision, torch's
    bf16 autocast), either with `@FOLDER`: an artifacts folder of its own for an onnxruntime or openvino
    entry (another precision of the same export, say an INT8 folder of `quantize`) in place of
    --artifacts."""

    name: str
    precision: str | None = None
    artifacts: Path | None = None

    @property
    def backend(self) -> str:
        """What the entry's own process gets as --backend."""
        return self.name if self.precision is None else f"{self.name}:{self.precision}"

    @property
    def label(self) -> str:
        return self.backend if self.artifacts is None else f"{self.backend}@{self.artifacts.name}"


def parse_backends(text: str, cpu_precision: str | None = None) -> list[BackendEntry]:
    """`--backend a,b:p,c@FOLDER,...` as entries, checked before any work: known names, precisions each
    backend takes, folders only for the backends that read ONNX graphs, no entry twice. --cpu-precision
    applies to the openvino entries that name no precision (and, as for one backend, is refused when
    none is openvino)."""
    from runtime.backend import BACKENDS, ONNX_BACKENDS

    items = [x.strip() for x in text.split(",")]
    if not text.strip() or any(not x for x in items):
        raise UsageError(f"--backend {text!r}: an empty name in the list; give NAME[:PRECISION][@FOLDER],... from {', '.join(BACKENDS)}")
    entries = []
    for item in items:
        head, at, folder = item.partition("@")
        name, _, precision = head.partition(":")
        if name not in BACKENDS:
            raise UsageError(f"--backend: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
        if at and (name not in ONNX_BACKENDS or not folder.strip()):
            raise UsageError(f"--backend {item}: " + (f"@FOLDER is an artifacts folder for {' or '.join(ONNX_BACKENDS)} entries"
                                                      if name not in ONNX_BACKENDS else "@ needs an artifacts folder after it"))
        if precision:
            allowed = ENTRY_PRECISIONS.get(name, ())
            if precision not in allowed:
                source, listed = ("engines", "") if name == "tensorrt" else ("artifacts", f" and list it as {name}@FOLDER")
                raise UsageError(f"--backend {item}: " + (f"{name} takes the precisions {', '.join(allowed)}" if allowed else
                                 f"{name} runs the precision of its {source} (make another folder with convert or quantize{listed})"))
        elif name == "openvino" and cpu_precision is not None:
            precision = cpu_precision
        entries.append(BackendEntry(name, precision or None, Path(folder.strip()) if at else None))
    if cpu_precision is not None and not any(e.name == "openvino" for e in entries):
        raise UsageError(f"--cpu-precision is for --backend openvino (not {text})")
    keys = [(e.backend, e.artifacts.resolve() if e.artifacts else None) for e in entries]
    twice = sorted({e.label for e, k in zip(entries, keys) if keys.count(k) > 1})
    if twice:
        raise UsageError(f"--backend lists {', '.join(twice)} twice")
    labels = [e.label for e in entries]
    same = sorted({x for x in labels if labels.count(x) > 1})
    if same:
        raise UsageError(f"--backend: two entries would both be labelled {same[0]} (folders of the same name); rename one")
    return entries


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, Any]:
    """Each output the two runs share (same inputs: spec dummy inputs, the same seed and prompt): rel L2
    and max abs error of the candidate against the reference; PSNR of the end-to-end images and of the
    VAE decoder's image (its [-1, 1] range)."""
    from exporter.metrics import error_stats
    from validation.images import psnr

    out: dict[str, Any] = {}
    for key in reference:
        if key not in candidate or reference[key].shape != candidate[key].shape:
            continue
        if key == "images":
            p = psnr(reference[key], candidate[key])
            out["images"] = {"psnr": None if p == float("inf") else p}
        else:
            s = error_stats(reference[key], candidate[key])
            out[key] = {"rel_l2": s.rel_l2, "max_abs": s.max_abs}
            if key == "vae_decoder.sample":
                p = psnr(np.clip(reference[key], -1, 1), np.clip(candidate[key], -1, 1), data_range=2.0)
                out[key]["psnr"] = None if p == float("inf") else p
    return out


# ----- rounds: the same entries again, on a host whose speed drifts ---------------------------------------

def merge_rounds(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One backend's `to_json()` records from several rounds as one: each stage's timed calls pooled
    (median, p90, ... over all of them), peak memory the highest, everything else from the first
    round; "rounds" holds each round's medians, which paired_speedups compares round by round."""
    first = records[0]
    out = {**first, "rounds": [round_medians(r) for r in records]}

    def pooled(recs: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        if any(r is None for r in recs):
            return None
        stats = latency_stats([c for r in recs for c in r["calls"]])  # type: ignore[index]
        merged = {**recs[0], **stats}  # type: ignore[dict-item]
        if "peak_memory_mb" in merged:
            merged["peak_memory_mb"] = max(r["peak_memory_mb"] for r in recs)  # type: ignore[index]
        return merged

    out["components"] = {k: pooled([r["components"].get(k) for r in records]) for k in first["components"]}
    if first.get("end_to_end"):
        e = pooled([r.get("end_to_end") for r in records])
        if e is not None:
            e["stages"] = {k: pooled([r["end_to_end"]["stages"].get(k) for r in records]) for k in first["end_to_end"]["stages"]}
            e["images_per_minute"] = 60.0 * first["batch"] / e["median"]
            out["images_per_minute"] = e["images_per_minute"]
        out["end_to_end"] = e
    out["memory"] = {**first["memory"], "peak_mb": max(r["memory"]["peak_mb"] for r in records)}
    out["runs"] = sum(r["runs"] for r in records)
    return out


def round_medians(record: dict[str, Any]) -> dict[str, float]:
    """A record's median per stage: each component and "end_to_end"."""
    out = {k: c["median"] for k, c in record["components"].items()}
    if record.get("end_to_end"):
        out["end_to_end"] = record["end_to_end"]["median"]
    return out


def paired_speedups(reference: list[dict[str, float]], candidate: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Speed-up of a candidate against the reference per stage: in each round the reference's median
    over the candidate's (both measured minutes apart, so a host that slows down over minutes slows
    both alike), and the median of those ratios over the rounds the two share."""
    out: dict[str, dict[str, Any]] = {}
    for stage in reference[0]:
        ratios = [r[stage] / c[stage] for r, c in zip(reference, candidate) if stage in r and stage in c and c[stage] > 0]
        if ratios:
            out[stage] = {"median": float(np.median(ratios)), "rounds": ratios}
    return out
