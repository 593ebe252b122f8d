"""GPU profiles: one TOML file per card (engines/profiles/*.toml) saying what to build for it and how
much device memory it offers. A user's own TOML file works the same way (pass its path).

Schema (every field is checked; an error names the field):

    name = "rtx3060ti"                       # required: [a-z0-9][a-z0-9._-]*
    description = "..."                      # optional
    [gpu]
    names = ["NVIDIA GeForce RTX 3060 Ti"]   # as CUDA reports them (a build on another model warns)
    compute_capability = "8.6"               # required, "major.minor"
    memory_gib = 8                           # required: device memory
    reserved_gib = 0.5                       # memory not available to koala-trt (display, ECC, OS)
    unified_memory = false                   # Jetson: device memory is the system's RAM
    [precision]                              # fp32 | fp16 | int8 per component
    text_encoder = "fp16"
    text_encoder_2 = "fp16"
    unet = "fp16"
    [vae]                                    # the VAE policy
    precision = "fp32"                       # SDXL's VAE overflows in FP16: fp16 needs fp16_safe = true
    fp16_safe = false                        # true only with an fp16-safe VAE (e.g. sdxl-vae-fp16-fix)
    fp16_ops = "all"                         # all | gemm: only the GEMMs in FP16 (convert --vae-gemm-fp16),
                                             # safe for SDXL's VAE: needs no fp16_safe (Turing + TensorRT-RTX)
    encoder = false                          # also build vae_encoder
    tile = 512                               # optional (default: none, whole images): decode in overlapping
                                             # tiles of 512x512 px (a multiple of 8, not larger than the image);
                                             # the decoder engine is built for the tile, so its activations no
                                             # longer grow with the image (docs/generate.md, "Tiled VAE decode")
    [shapes]                                 # a value (static) or [min, opt, max]
    batch = 1                                # images per call
    height = 1024                            # pixels
    width = 1024
    guidance = true                          # classifier-free guidance doubles the U-Net's batch
    prompt_chunks = [1, 1, 3]                # U-Net prompt length in chunks of 77 tokens (75 of the prompt);
                                             # default: the export's range, min and opt at its minimum
                                             # (1 keeps the U-Net engine static: CUDA graphs)
    [build]
    workspace_gib = 2                        # TensorRT workspace (tactic scratch) cap
    optimization_level = 3                   # builder optimization level 0..5
    hardware_compatibility = "none"          # none | ampere_plus | same_compute_capability
    version_compatible = false               # VERSION_COMPATIBLE engines (run on later TensorRT)
    refit = "none"                           # none | identical (REFIT_IDENTICAL + STRIP_PLAN: weights from
                                             # the identical ONNX at load) | weights (REFIT: `koala-trt refit`
                                             # gives the engine a LoRA-patched folder's weights)
    timing_cache = true                      # keep a timing cache in the engines folder (standard TensorRT)
    library = "tensorrt"                     # tensorrt | tensorrt-rtx (engines/libraries.py)
    weight_streaming = false                 # WEIGHT_STREAMING engines: weights beyond a device budget stay
                                             # in host memory and stream in at every call (TensorRT 10+, TensorRT-RTX)
    targets = ["8.6", "8.9", "12.0"]         # TensorRT-RTX: compute capabilities to build for
                                             # (default: gpu.compute_capability; several: a portable engine)
    [runtime]
    residency = "resident"                   # resident | sequential (one component at a time)
    cuda_graphs = true                       # replay CUDA graphs for engines with static shapes
    weight_streaming_budget_gib = 3.5        # device memory kept for the U-Net's weights (needs
                                             # build.weight_streaming; at most the card's usable memory;
                                             # default: the planner's largest budget that fits)
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from engines.libraries import LIBRARIES, RTX_NEEDS_GPU, library as get_library, sm
from exporter.specs import CACHE_COMPONENTS, COMPONENTS, ShapeRange, check_tile
from exporter.tolerances import PRECISIONS
from koala_core.errors import UsageError
from koala_core.schema import Fields as _Fields, Triple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
REFIT = ("none", "identical", "weights")
REFIT_FLAGS = {"none": "none", "identical": "REFIT_IDENTICAL+STRIP_PLAN", "weights": "REFIT"}  # the build flags recorded
RESIDENCY = ("resident", "sequential")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
GIB = 1 << 30


@dataclass(frozen=True)
class GpuSpec:
    compute_capability: str
    memory_gib: float
    reserved_gib: float = 0.0
    names: tuple[str, ...] = ()
    unified_memory: bool = False

    @property
    def sm(self) -> str:
        """"8.6" -> "86", as in sm_86."""
        return self.compute_capability.replace(".", "")

    @property
    def usable_bytes(self) -> int:
        return int((self.memory_gib - self.reserved_gib) * GIB)


@dataclass(frozen=True)
class VaePolicy:
    precision: str = "fp32"
    fp16_safe: bool = False
    encoder: bool = False
    fp16_ops: str = "all"  # all | gemm
    tile: int | None = None  # pixels: the decoder runs on tiles of tile x tile (sampler/vae_tiling.py); None: whole images


@dataclass(frozen=True)
class Shapes:
    batch: Triple = (1, 1, 1)
    height: Triple = (1024, 1024, 1024)
    width: Triple = (1024, 1024, 1024)
    guidance: bool = True
    prompt_chunks: Triple | None = None  # None: the U-Net export's range (engines.buildplan)

    @property
    def static(self) -> bool:
        return all(t[0] == t[2] for t in (self.batch, self.height, self.width, self.prompt_chunks or (1, 1, 1)))


@dataclass(frozen=True)
class BuildOptions:
    workspace_gib: float = 2.0
    optimization_level: int = 3
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    refit: str = "none"
    timing_cache: bool = True
    library: str = "tensorrt"
    targets: tuple[str, ...] = ()  # TensorRT-RTX: the compute capabilities built for (set by validation)
    weight_streaming: bool = False


@dataclass(frozen=True)
class RuntimeOptions:
    residency: str = "resident"
    cuda_graphs: bool = True
    weight_streaming_budget_gib: float | None = None  # the U-Net engine's budget; None: the planner's


@dataclass(frozen=True)
class GpuProfile:
    name: str
    gpu: GpuSpec
    precision: dict[str, str]
    vae: VaePolicy = VaePolicy()
    shapes: Shapes = Shapes()
    build: BuildOptions = BuildOptions()
    runtime: RuntimeOptions = RuntimeOptions()
    description: str = ""
    source: str = ""  # "builtin" or the TOML file's path
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the TOML as read

    # ----- what the build and the planner ask ----------------------------------------------
    def components(self) -> list[str]:
        """The components a pipeline on this card runs (vae_encoder only when the VAE policy asks)."""
        return [c for c in COMPONENTS if (c != "vae_encoder" or self.vae.encoder) and c not in CACHE_COMPONENTS]

    def precision_for(self, component: str) -> str:
        if component.startswith("vae"):
            return self.vae.precision
        if component not in self.precision and (component.startswith("unet_") or component == "controlnet"):
            return self.precision["unet"]  # U-Net variants (the caching and ControlNet pairs) and the ControlNet follow the U-Net's policy
        return self.precision[component]

    def shape_range(self, kind: str) -> ShapeRange:
        """The tensor shape range of a component of `kind` (a ComponentSpec.kind). With guidance the
        U-Net sees negative and positive prompts in one batch; text encoders are given either one
        prompt set per call or both at once, so their batch spans both; the VAE sees the images (with a
        [vae] tile, the decoder sees tiles of that size: the engine is built for them).
        Only the U-Net has a prompt-chunk range (None here: the build takes its export's)."""
        b, g = self.shapes.batch, 2 if self.shapes.guidance else 1
        unet_like = kind in ("unet", "controlnet")  # the ControlNet runs on the U-Net's batch and prompt
        if unet_like:
            batch = (b[0] * g, b[1] * g, b[2] * g)
        elif kind == "text_encoder":
            batch = (b[0], b[1] * g, b[2] * g)
        else:
            batch = b
        if kind == "vae_decoder" and self.vae.tile is not None:
            t = self.vae.tile
            return ShapeRange(batch, (t, t, t), (t, t, t))
        return ShapeRange(batch, self.shapes.height, self.shapes.width, self.shapes.prompt_chunks if unet_like else None)

    def with_overrides(self, batch: int | None = None, height: int | None = None, width: int | None = None,
                       precision: str | None = None) -> "GpuProfile":
        """This profile with static shapes or a precision for every non-VAE component set from the
        command line (the VAE keeps its policy)."""
        shapes = self.shapes
        if batch is not None:
            shapes = replace(shapes, batch=_static("--batch", batch))
        if height is not None:
            shapes = replace(shapes, height=_static("--height", height))
        if width is not None:
            shapes = replace(shapes, width=_static("--width", width))
        t = self.vae.tile
        if t is not None and (t > shapes.height[0] or t > shapes.width[0]):
            flag, side = ("--height", shapes.height[0]) if t > shapes.height[0] else ("--width", shapes.width[0])
            raise UsageError(f"{flag} {side} is smaller than profile {self.name}'s vae.tile ({t} px): the tile must "
                             "not be larger than the image")
        prec = dict(self.precision)
        if precision is not None:
            if precision not in PRECISIONS:
                raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
            prec = {k: precision for k in prec}
        return replace(self, shapes=shapes, precision=prec)

    def with_aids(self, tile: int | None = None, residency: str | None = None, weight_streaming: bool | None = None,
                  budget_gib: float | None = None, flags: bool = True) -> "GpuProfile":
        """This profile with the memory aids the planner (or the command line: --vae-tile, --residency,
        --weight-streaming, --weight-streaming-budget) asks for, checked as their TOML fields are."""
        vae, build, runtime = self.vae, self.build, self.runtime
        if tile is not None:
            problem = tile_problem(tile, self.shapes)
            if problem:
                raise UsageError(f"--vae-tile {problem.removeprefix('= ')}" if flags else f"field vae.tile {problem}")
            vae = replace(vae, tile=tile)
        if residency is not None:
            if residency not in RESIDENCY:
                raise UsageError(f"residency must be one of {', '.join(RESIDENCY)} (got {residency!r})")
            runtime = replace(runtime, residency=residency)
        if weight_streaming is not None:
            build = replace(build, weight_streaming=weight_streaming)
        if budget_gib is not None:
            problem = budget_problem(budget_gib, self)
            if problem:
                raise UsageError(f"--weight-streaming-budget {problem.removeprefix('= ')}" if flags
                                 else f"field runtime.weight_streaming_budget_gib {problem}")
            build = replace(build, weight_streaming=True)
            runtime = replace(runtime, weight_streaming_budget_gib=budget_gib)
        return replace(self, vae=vae, build=build, runtime=runtime)

    def with_library(self, name: str) -> "GpuProfile":
        """This profile built with another TensorRT library (`build --library`), checked as the TOML
        field build.library would be."""
        lib = get_library(name)
        if name == self.build.library:
            return self
        if not lib.can_target(self.gpu.compute_capability):
            raise UsageError(f"--library {name} cannot build for {self.name} ({sm(self.gpu.compute_capability)}): "
                             f"{name} targets {', '.join(sm(t) for t in lib.targets or ())}; use --library tensorrt "
                             "and build on the card")
        data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self.data.items()}
        build = data.setdefault("build", {})
        build["library"] = name
        build.pop("targets", None)
        if name == "tensorrt-rtx":  # what does not apply to TensorRT-RTX falls away instead of failing
            build.pop("hardware_compatibility", None)
        return profile_from_dict(data, f"profile {self.name} with --library {name}", self.source)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("data")
        d["gpu"]["names"] = list(self.gpu.names)
        d["build"]["targets"] = list(self.build.targets)
        d["shapes"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["shapes"].items()
                       if k != "prompt_chunks" or v is not None}
        return d


def tile_problem(tile: int, shapes: Shapes) -> str | None:
    """What is wrong with a VAE tile of `tile` pixels for images of `shapes` (None: nothing): the tile's
    own rule (exporter.specs.check_tile), then the smallest image the profile allows."""
    try:
        check_tile(tile)
    except ValueError as e:
        return str(e)
    h, w = shapes.height[0], shapes.width[0]
    if tile > min(h, w):
        return (f"= {tile} px is larger than the image ({h}x{w} px, the smallest the profile allows); use a tile of "
                f"at most {min(h, w)} px")
    return None


def budget_problem(budget_gib: float, profile: "GpuProfile") -> str | None:
    """What is wrong with a weight-streaming budget of `budget_gib` GiB on `profile`'s card (None: nothing)."""
    g = profile.gpu
    if isinstance(budget_gib, bool) or not isinstance(budget_gib, (int, float)) or budget_gib < 0:
        return f"must be a number of GiB, at least 0 (got {budget_gib!r})"
    if budget_gib * GIB > g.usable_bytes:
        return (f"= {budget_gib:g} GiB is larger than the card: {profile.name} has {g.usable_bytes / GIB:g} GiB usable "
                f"({g.memory_gib:g} GiB - {g.reserved_gib:g} GiB reserved)")
    return None


def _static(flag: str, v: int) -> Triple:
    if v < 1:
        raise UsageError(f"{flag} must be positive (got {v})")
    return (v, v, v)


# ----- loading and validation -----------------------------------------------------------------

def profile_from_dict(data: Mapping[str, Any], where: str, source: str = "") -> GpuProfile:
    """Validate a parsed TOML document; every error names the offending field."""
    top = _Fields(where, data, "")
    top.get("schema", 1)
    name = top.string("name", required=True)
    if not NAME_RE.match(name):
        raise top.err("name", f"must match [a-z0-9][a-z0-9._-]* (got {name!r})")
    description = top.string("description", "")

    g = top.table_of("gpu")
    cc_raw = g.get("compute_capability", required=True)
    cc = str(cc_raw) if isinstance(cc_raw, (str, float)) and not isinstance(cc_raw, bool) else ""
    if not re.match(r"^\d+\.\d$", cc):
        raise g.err("compute_capability", f"must be a string like \"8.6\" (got {cc_raw!r})")
    memory = g.number("memory_gib", required=True, positive=True)
    reserved = g.number("reserved_gib", 0.0)
    if reserved >= memory:
        raise g.err("reserved_gib", f"must be less than gpu.memory_gib ({reserved} >= {memory})")
    names = g.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise g.err("names", f"must be a list of strings (got {names!r})")
    gpu = GpuSpec(cc, memory, reserved, tuple(names), g.boolean("unified_memory", False))
    g.done()

    p = top.table_of("precision")
    precision = {c: p.string(c, "fp16", PRECISIONS) for c in ("text_encoder", "text_encoder_2", "unet")}
    p.done()

    v = top.table_of("vae")
    vae = VaePolicy(v.string("precision", "fp32", ("fp32", "fp16")), v.boolean("fp16_safe", False),
                    v.boolean("encoder", False), v.string("fp16_ops", "all", ("all", "gemm")), v.get("tile"))
    if vae.fp16_ops == "gemm" and vae.precision != "fp16":
        raise v.err("fp16_ops", "= \"gemm\" needs vae.precision = \"fp16\"")
    if vae.precision == "fp16" and vae.fp16_ops == "all" and not vae.fp16_safe:
        raise v.err("precision", "= \"fp16\" needs vae.fp16_safe = true: SDXL's VAE overflows in FP16 "
                    "(NaN, black images); use an fp16-safe VAE such as sdxl-vae-fp16-fix, set vae.fp16_ops = \"gemm\" "
                    "(only its GEMMs in FP16), or keep \"fp32\"")
    v.done()

    s = top.table_of("shapes")
    shapes = Shapes(s.triple("batch", (1, 1, 1)), s.triple("height", (1024,) * 3, 8),
                    s.triple("width", (1024,) * 3, 8), s.boolean("guidance", True),
                    s.triple("prompt_chunks", (1, 1, 1)) if s.get("prompt_chunks") is not None else None)
    s.done()
    if vae.tile is not None and (problem := tile_problem(vae.tile, shapes)):
        raise v.err("tile", problem)

    b = top.table_of("build")
    build = BuildOptions(b.number("workspace_gib", 2.0, positive=True), b.integer("optimization_level", 3, 0, 5),
                         b.string("hardware_compatibility", "none", HARDWARE_COMPATIBILITY),
                         b.boolean("version_compatible", False), b.string("refit", "none", REFIT),
                         b.boolean("timing_cache", True), b.string("library", "tensorrt", tuple(LIBRARIES)),
                         weight_streaming=b.boolean("weight_streaming", False))
    build = replace(build, targets=_targets(b, build, gpu))
    if build.hardware_compatibility == "ampere_plus" and int(cc.split(".")[0]) < 8:
        raise b.err("hardware_compatibility", f"= \"ampere_plus\" needs an Ampere or newer GPU (sm_80+); "
                    f"this profile's GPU is sm_{gpu.sm}")
    if build.hardware_compatibility == "ampere_plus" and gpu.unified_memory:
        raise b.err("hardware_compatibility", "= \"ampere_plus\" is not supported on Jetson (JetPack)")
    if build.workspace_gib >= memory:
        raise b.err("workspace_gib", f"must be less than gpu.memory_gib ({build.workspace_gib} >= {memory})")
    b.done()

    r = top.table_of("runtime")
    budget = r.get("weight_streaming_budget_gib")
    runtime = RuntimeOptions(r.string("residency", "resident", RESIDENCY), r.boolean("cuda_graphs", True))
    r.done()
    top.done()
    prof = GpuProfile(name=name, gpu=gpu, precision=precision, vae=vae, shapes=shapes, build=build,
                      runtime=runtime, description=description, source=source, data=dict(data))
    if budget is not None:
        if (problem := budget_problem(budget, prof)):
            raise r.err("weight_streaming_budget_gib", problem)
        if not build.weight_streaming:
            raise r.err("weight_streaming_budget_gib", "needs build.weight_streaming = true (a budget applies to "
                        "streamable engines only)")
        prof = replace(prof, runtime=replace(runtime, weight_streaming_budget_gib=float(budget)))
    return prof


def _targets(b: _Fields, build: BuildOptions, gpu: GpuSpec) -> tuple[str, ...]:
    """build.targets, checked against the library: TensorRT-RTX builds for listed compute
    capabilities (the card's own among them); standard TensorRT builds for the GPU it runs on."""
    lib = LIBRARIES[build.library]
    raw = b.get("targets")
    if raw is None:
        targets: tuple[str, ...] = (gpu.compute_capability,)
    elif lib.targets is None:
        raise b.err("targets", "applies to library = \"tensorrt-rtx\" only: standard TensorRT builds for the GPU "
                    "it runs on")
    elif (not isinstance(raw, list) or not raw or not all(isinstance(t, str) and re.match(r"^\d+\.\d$", t) for t in raw)
          or len(set(raw)) != len(raw)):
        raise b.err("targets", f"must be a list of distinct compute capabilities like [\"8.6\", \"8.9\"] (got {raw!r})")
    else:
        targets = tuple(raw)
        if gpu.compute_capability not in targets:
            raise b.err("targets", f"must include the profile's own gpu.compute_capability {gpu.compute_capability} "
                        f"(got {list(targets)})")
    if lib.targets is not None:
        known = ", ".join(sm(x) for x in lib.targets)
        for t in targets:
            if t not in lib.targets and raw is None:
                raise b.err("library", f"= \"tensorrt-rtx\" cannot build for this profile's {sm(t)}: TensorRT-RTX "
                            f"targets {known}; use library = \"tensorrt\" and build on the card")
            if t not in lib.targets:
                raise b.err("targets", f"lists {sm(t)}, which TensorRT-RTX cannot target (it targets {known})")
        if build.refit != "none":
            raise b.err("refit", f"= \"{build.refit}\": {RTX_NEEDS_GPU['refit_' + build.refit]} needs a GPU at build time with "
                        "TensorRT-RTX; build on the card with library = \"tensorrt\" or drop refit")
        if build.hardware_compatibility != "none":
            raise b.err("hardware_compatibility", "does not apply to TensorRT-RTX: its engines run on the compute "
                        "capabilities listed in build.targets")
        if build.version_compatible:
            raise b.err("version_compatible", "is not supported with TensorRT-RTX: its engines are tied to the "
                        "TensorRT-RTX version that built them (rebuild after an upgrade)")
    return tuple(sorted(targets, key=lambda t: tuple(int(x) for x in t.split("."))))


def _builtin_dir() -> Any:
    return resources.files("engines").joinpath("profiles")


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{where} is not valid TOML ({e})") from None


def load_profile(ref: str | Path) -> GpuProfile:
    """A built-in profile by name (`rtx3060ti`) or a TOML file by path."""
    s = str(ref)
    path = Path(s).expanduser()
    if s.endswith(".toml") or path.exists() or "/" in s:
        if not path.exists():
            raise UsageError(f"profile file {path} does not exist")
        if not path.is_file():
            raise UsageError(f"profile file {path} is not a file (a GPU profile is one .toml file)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read profile {path}: {e}") from None
        return profile_from_dict(_parse(text, str(path)), str(path), source=str(path.resolve()))
    res = _builtin_dir().joinpath(f"{s}.toml")
    if not res.is_file():
        raise UsageError(f"unknown GPU profile {s!r}; built-in profiles: {', '.join(builtin_names())} "
                         "(or pass the path of your own .toml)")
    return profile_from_dict(_parse(res.read_text(encoding="utf-8"), f"profile {s}"), f"profile {s}", source="builtin")


def list_profiles() -> list[GpuProfile]:
    return [load_profile(n) for n in builtin_names()]


def profile_sha256(profile: GpuProfile) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(profile.to_json(), sort_keys=True).encode()).hexdigest()


def profile_for_device(name: str, compute_capability: str) -> GpuProfile | None:
    """The built-in profile for a local GPU: by its CUDA name, else the only one with its compute capability."""
    profiles = list_profiles()
    for p in profiles:
        if name in p.gpu.names:
            return p
    same_cc = [p for p in profiles if p.gpu.compute_capability == compute_capability]
    return same_cc[0] if len(same_cc) == 1 else None
