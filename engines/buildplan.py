"""The build plan: what `koala-trt build` will do, worked out from the artifact manifests and the GPU
profile without TensorRT (so `--dry-run` runs anywhere): per component the ONNX folder whose
precision the profile asks for, the optimization profile per input from the card's shape ranges
(checked against the ranges the export recorded), the builder flags, the engine's file name and a
memory estimate.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.libraries import LIBRARIES, RTX_NOT_APPLICABLE, Library, sm
from engines.planner import MemoryPlan
from engines.profile import GIB, GpuProfile
from engines.artifacts_check import check_files
from exporter.manifest import Manifest, load_manifest
from exporter.specs import ComponentSpec, ShapeRange
from koala_core.errors import UsageError
from koala_core.schema import FileRecord

TIMING_CACHE = "timing.cache"

# Components whose graphs hold GEMMs (MatMul/Gemm): all of them, the VAE's through its mid-block attention.
GEMM_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
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
                version: str | None, hardware_compatibility: str = "none", library: str = "tensorrt") -> str:
    """<component>.<precision>.<shapes>.<sm>.<library><version>.plan, e.g.
    unet.fp16.b2.1024x1024.sm86.trt10.8.0.43.plan (TensorRT) or unet.fp16.b2.1024x1024.sm86.rtx1.7.1.116.plan
    (TensorRT-RTX)."""
    return (f"{component}.{precision}.{shapes_token(rng, spatial)}."
            f"{target_token(targets, hardware_compatibility)}.{LIBRARIES[library].token}{version or 'none'}.plan")


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
                "inputs": {n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in self.profile_shapes.items()}}


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
            "refit": "REFIT_IDENTICAL+STRIP_PLAN" if b.refit == "identical" else "none",
            "timing_cache": TIMING_CACHE if b.timing_cache and not rtx else None,
            "tf32": False,
        }
        if rtx:
            flags["compute_capabilities"] = list(self.targets)
            flags["not_applicable"] = dict(RTX_NOT_APPLICABLE)
        return flags

    def notes(self) -> list[str]:
        """What the manifest should say about this build beyond its flags."""
        if self.library.name == "tensorrt-rtx" and any(c.precision == "int8" for c in self.components.values()):
            return [INT8_ON_RTX]
        return []

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
    for key in ("precision", "batch", "height", "width"):
        if args.get(key) is not None:
            parts += [f"--{key}", str(args[key])]
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


def check_shapes(component: str, spec: ComponentSpec, rng: ShapeRange, exported: ShapeRange, root: Path) -> None:
    """The engine's shape range must lie inside the range the export recorded and checked."""
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
        raise UsageError(f"{component}: input {carrier} needs {bad}, outside the range its export recorded "
                         f"({what} {have[0]}..{have[2]}{unit}, {root}): the limit is {limit}; set --{what} "
                         f"within it, or re-export at a size whose range covers it")
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


def make_build_plan(onnx_dirs: list[Path], profile: GpuProfile, out: Path, components: list[str] | None = None,
                    trt_version: str | None = None, estimate: bool = True, args: dict[str, Any] | None = None,
                    log: Any = None) -> BuildPlan:
    """Everything the build needs decided, checked and named; imports no TensorRT."""
    if not onnx_dirs:
        raise UsageError("pass at least one artifacts folder with --onnx")
    manifests = [load_manifest(d) for d in onnx_dirs]
    plan = BuildPlan(profile=profile, onnx_dirs=[m.root.resolve() for m in manifests], out=Path(out),
                     trt_version=trt_version, args=dict(args or {}))
    plan.args.setdefault("onnx", [str(d) for d in plan.onnx_dirs])
    plan.args.setdefault("profile", profile.name if profile.source == "builtin" else profile.source)
    for name in components or profile.components():
        precision = profile.precision_for(name)
        check_precision(name, precision, profile)
        m = _pick_folder(manifests, name, precision, profile)
        spec = m.spec(name)
        rng = profile.shape_range(spec.kind)
        check_shapes(name, spec, rng, m.shape_range(name), m.root)
        plan.components[name] = ComponentBuild(
            component=name, precision=precision, manifest=m, spec=spec, shape_range=rng,
            profile_shapes=spec.profile_shapes(rng),
            engine=engine_name(name, precision, rng, spec.spatial, profile.build.targets, trt_version,
                               profile.build.hardware_compatibility, profile.build.library),
            onnx_files=_component_files(m, name))
        check_files(m, [f"{name}/"], full_hash=False)  # a missing or cut-short graph, before any work
    if estimate:
        plan.memory = estimate_memory(plan, log)
    return plan


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

        from exporter.sources import resolve

        source = resolve(model)
    except ImportError:
        reason = "activations not estimated: torch is not installed (weights only: a lower bound)"
        return weights_only_plan(model, plan.profile, specs, precisions, weights, parameters, reason)
    except Exception as e:  # the source folder or hub id is not reachable from here
        reason = f"activations not estimated: source model {model!r} unavailable ({str(e).splitlines()[0][:120]})"
        return weights_only_plan(model, plan.profile, specs, precisions, weights, parameters, reason)
    return plan_memory(source, plan.profile, list(comps), specs=specs, precisions=precisions, weights_override=weights)
