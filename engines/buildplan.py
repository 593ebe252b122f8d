"""The build plan: what `koala-trt build` will do, worked out from the artifact manifests and the GPU
profile without TensorRT (so `--dry-run` runs anywhere): per component the ONNX folder whose
precision the profile asks for, the optimization profile per input from the card's shape ranges
(checked against the ranges the export recorded), the builder flags, the engine's file name and a
memory estimate.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engines.libraries import LIBRARIES, RTX_NOT_APPLICABLE, Library, check_weight_streaming, sm
from engines.planner import MemoryPlan
from engines.profile import GIB, REFIT_FLAGS, GpuProfile
from exporter.artifacts_check import check_files
from exporter.manifest import Manifest, load_manifest
from exporter.specs import CACHE_COMPONENTS, VARIANT_COMPONENTS, ComponentSpec, ShapeRange
from koala_core.errors import UsageError
from koala_core.schema import FileRecord

TIMING_CACHE = "timing.cache"

# Components whose graphs hold GEMMs (MatMul/Gemm): all of them, the VAE's through its mid-block attention.
GEMM_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", *CACHE_COMPONENTS, *VARIANT_COMPONENTS)
WEIGHT_STREAMING_NOTE = ("weight streaming: the engines are streamable (WEIGHT_STREAMING); the runtime keeps each engine's "
                         "budget of weights on the device and streams the rest from host memory at every call")
INT8_ON_RTX = ("full INT8 Q/DQ (activations and weights) builds for TensorRT-RTX, but NVIDIA documents only "
               "weight-only INT8 GEMMs for it: whether it runs as true INT8 on the card is unverified")


def _part(t: tuple[int, int, int]) -> str:
    return str(t[0]) if t[0] == t[1] == t[2] else f"{t[0]}-{t[1]}-{t[2]}"


def shapes_token(rng: ShapeRange, spatial: bool) -> str:
    """`b2.1024x1024` for static shapes; `b2-4-8.768-1024-1024x1024` with min-opt-max where dynamic."""
    return f"b{_part(rng.batch)}" + (f".{_part(rng.height)}x{_part(rng.width)}" if spatial else "")


def target_token(targets: str | tuple[str, ...], hardware_compatibility: str = "none") -> str:
    """sm86; sm80plus for AMPERE_PLUS engines (they run on any sm_80+ GPU); sm86-89-120 for an
    engine with several targets (TensorRT-RTX)."""
    if hardware_compatibility == "ampere_plus":
        return "sm80plus"
    ccs = (targets,) if isinstance(targets, str) else tuple(targets)
    return "sm" + "-".join(cc.replace(".", "") for cc in ccs)


def engine_name(component: str, precision: str, rng: ShapeRange, spatial: bool, targets: str | tuple[str, ...],
                version: str | None, hardware_compatibility: str = "none", library: str = "tensorrt",
                streaming: bool = False) -> str:
    """<component>.<precision>.<shapes>.<sm>.<library><version>[.ws].plan, e.g.
    unet.fp16.b2.1024x1024.sm86.trt10.8.0.43.plan (TensorRT) or unet.fp16.b2.1024x1024.sm86.rtx1.7.1.116.plan
    (TensorRT-RTX); `.ws` marks a streamable (WEIGHT_STREAMING) engine."""
    return (f"{component}.{precision}.{shapes_token(rng, spatial)}."
            f"{target_token(targets, hardware_compatibility)}.{LIBRARIES[library].token}{version or 'none'}"
            f"{'.ws' if streaming else ''}.plan")


@dataclass
class ComponentBuild:
    component: str
    precision: str
    manifest: Manifest
    spec: ComponentSpec
    shape_range: ShapeRange
    profile_shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    engine: str
    onnx_files: dict[str, FileRecord]  # rel path -> sha256 and size, as the artifacts manifest records them
    vae_tile: int | None = None  # vae_decoder: built for tiles of this many pixels (the profile's [vae] tile)

    @property
    def onnx_path(self) -> Path:
        return self.manifest.onnx_path(self.component)

    @property
    def onnx_sha256(self) -> str:
        return self.onnx_files[self.manifest.record(self.component).file].sha256

    @property
    def onnx_bytes(self) -> int:
        return sum(f.bytes for f in self.onnx_files.values())

    @property
    def static(self) -> bool:
        return all(lo == hi for lo, _, hi in self.profile_shapes.values())

    def to_json(self) -> dict[str, Any]:
        return {"precision": self.precision, "onnx": str(self.onnx_path), "onnx_sha256": self.onnx_sha256,
                "onnx_bytes": self.onnx_bytes, "engine": self.engine, "static": self.static,
                "shape_range": self.shape_range.to_json(),
                "export_range": self.manifest.shape_range(self.component).to_json(),
                "inputs": {n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in self.profile_shapes.items()},
                **({"vae_tile": self.vae_tile} if self.vae_tile is not None else {})}


@dataclass
class BuildPlan:
    profile: GpuProfile
    onnx_dirs: list[Path]
    out: Path
    trt_version: str | None  # the version of the plan's library (TensorRT or TensorRT-RTX)
    components: dict[str, ComponentBuild] = field(default_factory=dict)
    memory: MemoryPlan | None = None
    args: dict[str, Any] = field(default_factory=dict)  # what the command line said: for the rebuild command

    @property
    def library(self) -> Library:
        return LIBRARIES[self.profile.build.library]

    @property
    def targets(self) -> tuple[str, ...]:
        return self.profile.build.targets

    @property
    def flags(self) -> dict[str, Any]:
        b = self.profile.build
        rtx = self.library.name == "tensorrt-rtx"
        flags = {
            "library": self.library.name,
            "strongly_typed": True,
            "precision_flags": "none: strongly typed, precision comes from the ONNX graph",
            "builder_optimization_level": b.optimization_level,
            "workspace_bytes": int(b.workspace_gib * GIB),
            "hardware_compatibility": b.hardware_compatibility,  # "none" for TensorRT-RTX (see not_applicable)
            "version_compatible": b.version_compatible,
            "refit": REFIT_FLAGS[b.refit],
            "timing_cache": TIMING_CACHE if b.timing_cache and not rtx else None,
            "tf32": False,
            "weight_streaming": b.weight_streaming,
        }
        if rtx:
            flags["compute_capabilities"] = list(self.targets)
            flags["not_applicable"] = dict(RTX_NOT_APPLICABLE)
        return flags

    def notes(self) -> list[str]:
        """What the manifest should say about this build beyond its flags."""
        out = []
        if self.library.name == "tensorrt-rtx" and any(c.precision == "int8" for c in self.components.values()):
            out.append(INT8_ON_RTX)
        if self.profile.build.weight_streaming:
            out.append(WEIGHT_STREAMING_NOTE)
        return out

    def streaming_budgets(self) -> dict[str, dict[str, Any]]:
        """Per component, the weight-streaming budget the runtime sets (bytes of weights kept on the device):
        the memory plan's, else the profile's for the U-Net, else TensorRT's automatic budget (null)."""
        if not self.profile.build.weight_streaming:
            return {}
        user = self.profile.runtime.weight_streaming_budget_gib
        out = {}
        for name in self.components:
            m = self.memory.components.get(name) if self.memory else None
            if name == "unet" and user is not None:
                out[name] = {"budget_bytes": int(user * GIB), "from": "profile"}
            elif m is not None and m.kept_bytes is not None:
                out[name] = {"budget_bytes": m.device_weights_bytes, "from": "plan"}
            else:
                out[name] = {"budget_bytes": None, "from": "automatic"}
        return out

    def rebuild_command(self) -> str:
        return build_command(self.args, self.out)

    def to_json(self) -> dict[str, Any]:
        return {"profile": self.profile.name, "profile_source": self.profile.source,
                "compute_capability": self.profile.gpu.compute_capability, "library": self.library.name,
                "library_version": self.trt_version, "targets": list(self.targets), "notes": self.notes(),
                "onnx": [str(d) for d in self.onnx_dirs], "out": str(self.out), "flags": self.flags,
                "components": {k: {**v.to_json(), **({"memory": self.memory.components[k].to_json()}
                                                    if self.memory and k in self.memory.components else {})}
                               for k, v in self.components.items()},
                "memory": ({k: v for k, v in self.memory.to_json().items() if k != "components"}
                           if self.memory else None),
                "weight_streaming": self.streaming_budgets() or None,
                "command": self.rebuild_command()}


def build_command(args: dict[str, Any], out: Path | str) -> str:
    """The `koala-trt build` command line that reproduces a build (used in rebuild messages)."""
    parts = ["koala-trt", "build"]
    for d in args.get("onnx", []):
        parts += ["--onnx", str(d)]
    parts += ["--profile", str(args.get("profile", "PROFILE")), "--out", str(out)]
    if args.get("library"):
        parts += ["--library", str(args["library"])]
    if args.get("components"):
        parts += ["--components", ",".join(args["components"])]
    for key in ("precision", "batch", "height", "width", "vae_tile", "residency", "weight_streaming_budget"):
        if args.get(key) is not None:
            parts += [f"--{key.replace('_', '-')}", str(args[key])]
    if args.get("weight_streaming"):
        parts.append("--weight-streaming")
    parts.append("--force")
    return " ".join(shlex.quote(p) for p in parts)


# ----- making the plan -------------------------------------------------------------------------

def _component_files(m: Manifest, component: str) -> dict[str, FileRecord]:
    files = {rel: meta for rel, meta in m.view.files.items() if rel.startswith(f"{component}/")}
    if m.record(component).file not in files:
        raise UsageError(f"{m.root}/manifest.json records no sha256 for {m.record(component).file}; "
                         "the folder is incomplete: export it again")
    return files


def _vae_fp16_ops(m: Manifest, component: str) -> str:
    """"gemm" when only the VAE's GEMMs were converted (convert --vae-gemm-fp16), else "all"."""
    return str((m.component(component).get("conversion") or {}).get("fp16_ops", "all"))


def _pick_folder(manifests: list[Manifest], component: str, precision: str, profile: GpuProfile) -> Manifest:
    holding = [m for m in manifests if component in m.components]
    if not holding:
        raise UsageError(f"no --onnx folder holds {component} ({', '.join(str(m.root) for m in manifests)})")
    gemm_only = component.startswith("vae") and precision == "fp16" and profile.vae.fp16_ops == "gemm"
    for m in holding:
        if m.precision(component) == precision and (not gemm_only or profile.vae.fp16_safe
                                                    or _vae_fp16_ops(m, component) == "gemm"):
            return m
    have = ", ".join(f"{m.root} holds {m.precision(component)}" for m in holding)
    if gemm_only:
        remedy = (f"make one with `koala-trt convert --onnx {holding[0].root} --vae-gemm-fp16 --out DIR` (FP16 GEMMs, "
                  "FP32 elsewhere) and pass both folders with --onnx")
    elif precision == "fp16":
        remedy = (f"make one with `koala-trt convert --onnx {holding[0].root} --precision {precision} --out DIR` and pass "
                  "both folders with --onnx")
    elif precision in ("int8", "fp8"):
        flag = "" if precision == "int8" else f" --precision {precision}"
        remedy = (f"make one with `koala-trt quantize --onnx {holding[0].root}{flag} --calib CALIB --out DIR` and pass both "
                  "folders with --onnx")
    elif precision == "int8-wo":
        remedy = (f"make one with `koala-trt quantize --onnx {holding[0].root} --precision int8-wo --out DIR` and pass both "
                  "folders with --onnx")
    else:
        remedy = "pass an fp32 export with --onnx"
    what = f"{precision} (GEMMs only)" if gemm_only else precision
    raise UsageError(f"profile {profile.name} wants {component} in {what} but no --onnx folder holds it "
                     f"({have}); {remedy}, or choose the precision with --precision")


def resolve_prompt_chunks(component: str, spec: ComponentSpec, rng: ShapeRange, exported: ShapeRange, root: Path) -> ShapeRange:
    """The prompt-chunk range an engine is built for: the profile's [shapes] prompt_chunks, else the
    export's (min and opt at its minimum: 77 tokens, max its longest); none for a graph without a
    sequence axis or one exported before long prompts (fixed at 77)."""
    if not spec.has_sequence or exported.prompt_chunks is None:
        if rng.prompt_chunks is not None and rng.prompt_chunks[2] > 1:
            raise UsageError(f"{component}: [shapes] prompt_chunks asks for up to {rng.prompt_chunks[2]} chunks but its export "
                             f"takes one (77 tokens, {root}); re-export with `koala-trt export --max-prompt-chunks "
                             f"{rng.prompt_chunks[2]}`, or set prompt_chunks = 1")
        return replace(rng, prompt_chunks=None)
    if rng.prompt_chunks is None:
        lo, _, hi = exported.prompt_chunks
        return replace(rng, prompt_chunks=(lo, lo, hi))
    return rng


def check_shapes(component: str, spec: ComponentSpec, rng: ShapeRange, exported: ShapeRange, root: Path,
                 tile: int | None = None) -> None:
    """The engine's shape range must lie inside the range the export recorded and checked (for a
    tiled VAE decoder, `tile` x `tile`: the profile's [vae] tile)."""
    dims = {"batch": ("batch", "batch", ""), "height": ("height", "latent_height", " px"),
            "width": ("width", "latent_width", " px")}
    for what, (pixel_dim, latent_dim, unit) in dims.items():
        if what != "batch" and not spec.spatial:
            continue
        want, have = getattr(rng, what), getattr(exported, what)
        carrier = next((t.name for t in spec.inputs if pixel_dim in t.dims or latent_dim in t.dims), spec.inputs[0].name)
        if want[2] > have[2]:
            bad, limit = f"{what} {want[2]}{unit}", f"at most {have[2]}{unit}"
        elif want[0] < have[0]:
            bad, limit = f"{what} {want[0]}{unit}", f"at least {have[0]}{unit}"
        else:
            continue
        fix = f"set [vae] tile within it (the decoder is built for {tile} px tiles)" if tile and what != "batch" \
            else f"set --{what} within it"
        raise UsageError(f"{component}: input {carrier} needs {bad}, outside the range its export recorded "
                         f"({what} {have[0]}..{have[2]}{unit}, {root}): the limit is {limit}; {fix}, "
                         f"or re-export at a size whose range covers it")
    if rng.prompt_chunks is not None and exported.prompt_chunks is not None:
        (lo, _, hi), (have_lo, _, have_hi) = rng.prompt_chunks, exported.prompt_chunks
        if hi > have_hi or lo < have_lo:
            raise UsageError(f"{component}: input encoder_hidden_states needs prompt_chunks {lo}..{hi}, outside the range "
                             f"its export recorded ({have_lo}..{have_hi} chunks of 77 tokens, {root}); set [shapes] "
                             f"prompt_chunks within it, or re-export with --max-prompt-chunks {hi}")
    if spec.spatial:
        for h, w in zip(rng.height, rng.width):
            spec.check_size(h, w)


# The oldest compute capability each precision builds for: FP8 (E4M3) tensor cores from Ada/Hopper
# (sm_89); weight-only INT8 GEMMs from Ampere (sm_80), as NVIDIA documents it for TensorRT-RTX.
MIN_COMPUTE = {"fp8": (8, 9), "int8-wo": (8, 0)}


def check_precision(component: str, precision: str, profile: GpuProfile) -> None:
    """What a target cannot build, refused before building: TensorRT-RTX has no FP32 GEMMs on Turing
    (sm_75), FP8 needs sm_89 or newer, weight-only INT8 sm_80 or newer."""
    b = profile.build
    if precision in MIN_COMPUTE:
        need = MIN_COMPUTE[precision]
        low = [t for t in b.targets if tuple(int(x) for x in t.split(".")) < need]
        if low:
            raise UsageError(f"{precision} needs {sm(f'{need[0]}.{need[1]}')} or newer; {profile.name} is {sm(low[0])}")
    if b.library == "tensorrt-rtx" and "7.5" in b.targets and precision == "fp32" and component in GEMM_COMPONENTS:
        remedy = ("use --precision fp16" if not component.startswith("vae") else
                  "make its VAE with FP16 GEMMs (`koala-trt convert --vae-gemm-fp16`) and set vae.precision = "
                  "\"fp16\" with vae.fp16_ops = \"gemm\" in the profile (rtx2080ti does), or build on the card "
                  "with --library tensorrt")
        raise UsageError(f"{profile.name} ({sm('7.5')}, TensorRT-RTX) cannot build {component} in fp32: TensorRT-RTX "
                         f"has no FP32 GEMM on Turing; {remedy}")


BARE_REFIT_BROKEN = "11.3."  # TensorRT 11.3's known issue: BuilderFlag.REFIT may drop a GEMM bias (REFIT_IDENTICAL does not)


def make_build_plan(onnx_dirs: list[Path], profile: GpuProfile, out: Path, components: list[str] | None = None,
                    trt_version: str | None = None, estimate: bool = True, args: dict[str, Any] | None = None,
                    log: Any = None) -> BuildPlan:
    """Everything the build needs decided, checked and named; imports no TensorRT."""
    if not onnx_dirs:
        raise UsageError("pass at least one artifacts folder with --onnx")
    if profile.build.refit == "weights" and (trt_version or "").startswith(BARE_REFIT_BROKEN):
        raise UsageError(f"{profile.name}: build.refit = \"weights\" builds with bare REFIT, which TensorRT {trt_version} "
                         "can get wrong (NVIDIA's known issue in 11.3: a GEMM bias dropped); use another TensorRT version, "
                         "or refit = \"none\" and rebuild from each LoRA-patched folder")
    manifests = [load_manifest(d) for d in onnx_dirs]
    plan = BuildPlan(profile=profile, onnx_dirs=[m.root.resolve() for m in manifests], out=Path(out),
                     trt_version=trt_version, args=dict(args or {}))
    plan.args.setdefault("onnx", [str(d) for d in plan.onnx_dirs])
    plan.args.setdefault("profile", profile.name if profile.source == "builtin" else profile.source)
    if profile.build.weight_streaming:
        check_weight_streaming(plan.library, trt_version)
    # Feature caching's U-Net pair is built by default where the artifacts hold it (`export --cache-branch`).
    # Without a plain unet (`export --cache-branch B -c ...` left it out) the pair is the U-Net. Likewise
    # the U-Net variants (the ControlNet pair) the artifacts hold.
    cached = [c for c in CACHE_COMPONENTS if any(c in m.view.components for m in manifests)]
    plain = any("unet" in m.view.components for m in manifests) or len(cached) < 2
    variants = [v for v in VARIANT_COMPONENTS if any(v in m.components for m in manifests)]
    for name in components or [*(c for c in profile.components() if c != "unet" or plain), *cached, *variants]:
        precision = profile.precision_for(name)
        check_precision(name, precision, profile)
        m = _pick_folder(manifests, name, precision, profile)
        spec = m.spec(name)
        rng = resolve_prompt_chunks(name, spec, profile.shape_range(spec.kind), m.shape_range(name), m.root)  # a tiled VAE decoder: the [vae] tile's size
        tile = profile.vae.tile if spec.kind == "vae_decoder" else None
        check_shapes(name, spec, rng, m.shape_range(name), m.root, tile)
        plan.components[name] = ComponentBuild(
            component=name, precision=precision, manifest=m, spec=spec, shape_range=rng,
            profile_shapes=spec.profile_shapes(rng),
            engine=engine_name(name, precision, rng, spec.spatial, profile.build.targets, trt_version,
                               profile.build.hardware_compatibility, profile.build.library,
                               profile.build.weight_streaming),
            onnx_files=_component_files(m, name), vae_tile=tile)
        check_files(m, [f"{name}/"], full_hash=False)  # a missing or cut-short graph, before any work
    if estimate:
        plan.memory = estimate_memory(plan, log)
    return plan


def plan_function(plan: BuildPlan) -> Any:
    """profile -> MemoryPlan for this build's components, weights from the ONNX files' bytes (the
    planner's chooser calls it once per rung); None when the source model cannot be traced here."""
    from engines.planner import plan_memory

    comps = plan.components
    specs = {k: c.spec for k, c in comps.items()}
    precisions = {k: c.precision for k, c in comps.items()}
    weights = {k: c.onnx_bytes for k, c in comps.items()}
    first = next(iter(comps.values())).manifest
    try:
        import torch  # noqa: F401

        from exporter.sources import resolve_recorded

        source = resolve_recorded(first.view.source.model, first.view.source.controlnet)
    except Exception:  # torch missing, or the source folder or hub id is not reachable from here
        return None
    return lambda profile: plan_memory(source, profile, list(comps), specs=specs, precisions=precisions,
                                       weights_override=weights)


def auto_plan(onnx_dirs: list[Path], profile: GpuProfile, out: Path, components: list[str] | None = None,
              trt_version: str | None = None, args: dict[str, Any] | None = None) -> tuple[BuildPlan, Any]:
    """`build --auto`: the planner's choice of memory aids (plan_choice.choose) for these artifacts on this
    card, then the build plan with them. Returns (plan, choice); refuses when nothing fits."""
    from engines.plan_choice import choose
    from koala_core.errors import KoalaError

    first = make_build_plan(onnx_dirs, profile, out, components, trt_version, estimate=False, args=args)
    plan_fn = plan_function(first)
    if plan_fn is None:
        raise UsageError(f"--auto needs the memory plan, which traces the source model "
                         f"{next(iter(first.components.values())).manifest.view.source.model!r}: it is not available "
                         "here (or torch is missing); choose the aids yourself (--vae-tile, --residency, --weight-streaming)")
    choice = choose(profile, plan_fn, list(first.components))
    if choice.chosen is None:
        raise KoalaError(f"--auto: {choice.summary()} on {profile.name}")
    chosen = choice.chosen.plan.profile
    a = dict(args or {})
    a.update(vae_tile=chosen.vae.tile or None, residency=chosen.runtime.residency,
             weight_streaming=chosen.build.weight_streaming or None, auto=None)
    plan = make_build_plan(onnx_dirs, chosen, out, components, trt_version, estimate=False, args=a)
    plan.memory = choice.chosen.plan
    return plan, choice


def estimate_memory(plan: BuildPlan, log: Any = None) -> MemoryPlan:
    """Weights from the ONNX files' bytes; activations traced on the meta device from the source
    model's configs when torch and the source are at hand, else a weights-only lower bound."""
    from engines.planner import plan_memory, weights_only_plan

    comps = plan.components
    specs = {k: c.spec for k, c in comps.items()}
    precisions = {k: c.precision for k, c in comps.items()}
    weights = {k: c.onnx_bytes for k, c in comps.items()}
    first = next(iter(comps.values())).manifest if comps else None
    model = first.view.source.model if first else "?"
    parameters = {k: c.manifest.record(k).parameters or 0 for k, c in comps.items()}
    try:
        import torch  # noqa: F401

        from exporter.sources import resolve_recorded

        source = resolve_recorded(model, first.view.source.controlnet if first else None)
    except ImportError:
        reason = "activations not estimated: torch is not installed (weights only: a lower bound)"
        return weights_only_plan(model, plan.profile, specs, precisions, weights, parameters, reason)
    except Exception as e:  # the source folder or hub id is not reachable from here
        reason = f"activations not estimated: source model {model!r} unavailable ({str(e).splitlines()[0][:120]})"
        return weights_only_plan(model, plan.profile, specs, precisions, weights, parameters, reason)
    return plan_memory(source, plan.profile, list(comps), specs=specs, precisions=precisions, weights_override=weights)
