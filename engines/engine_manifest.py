"""ENGINES/manifest.json: what a `koala-trt build` folder holds and what it was built for (GPU,
compute capability, TensorRT and CUDA versions, source ONNX sha256, flags, build times, sizes, and
the component specs so the TensorRT runtime knows names, dtypes and shapes without torch).

Loading checks the local GPU and TensorRT against it and refuses a mismatch with the exact command
that rebuilds the engines here. numpy/json only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.buildplan import build_command
from engines.compat import cc_allowed, engine_verdict, facts_for_device
from engines.cuda import DeviceInfo
from engines.engines_record import READ_VERSIONS, Compat, EnginesRecord, Library, Targets, normalize_cc
from exporter.specs import ComponentSpec, ShapeRange
from koala_core.errors import KoalaError, UsageError
from koala_core.jsonfile import read_folder_manifest

MANIFEST = "manifest.json"
FORMAT = "koala-trt/engines"
FORMAT_VERSION = 2  # what engines/build.py writes (library, targets, build_host); load_engines_manifest reads 1 and 2


@dataclass
class EnginesManifest:
    root: Path
    data: dict[str, Any]
    record: EnginesRecord  # the typed keys (library, targets, build host, plan files), read once

    @property
    def engines(self) -> dict[str, dict[str, Any]]:
        return self.data["engines"]

    def entry(self, component: str) -> dict[str, Any]:
        if component not in self.engines:
            raise UsageError(f"{self.root} has no {component} engine (it holds {', '.join(self.engines) or 'none'})")
        return self.engines[component]

    def spec(self, component: str) -> ComponentSpec:
        return ComponentSpec.from_json(self.entry(component)["spec"])

    def specs(self) -> dict[str, ComponentSpec]:
        return {c: self.spec(c) for c in self.engines}

    def engine_path(self, component: str) -> Path:
        return self.root / self.entry(component)["file"]

    def shape_range(self, component: str) -> ShapeRange:
        return ShapeRange.from_json(self.entry(component)["shape_range"])

    def profile_shapes(self, component: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        return {n: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"]))
                for n, v in self.entry(component)["inputs"].items()}

    def vae_tile(self) -> int | None:
        """The tile (pixels) its vae_decoder engine was built for (a profile's [vae] tile); None: whole images."""
        t = self.engines.get("vae_decoder", {}).get("vae_tile")
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise UsageError(f"{self.root / MANIFEST}: engines.vae_decoder.vae_tile must be a positive integer (got {t!r}); "
                             "rebuild with `koala-trt build`")
        return t

    def rebuild_command(self, profile: str | None = None) -> str:
        args = dict(self.data.get("build", {}).get("args", {}))
        if profile:
            args["profile"] = profile
        return build_command(args, self.root)


ENTRY_KEYS = ("file", "spec", "shape_range", "inputs")  # what the runtime reads of each engine


def load_engines_manifest(root: Path | str) -> EnginesManifest:
    """ROOT/manifest.json, either format version (engines_record.READ_VERSIONS), its keys checked."""
    data = read_folder_manifest(root, MANIFEST, FORMAT, "engines", "create one with `koala-trt build`", max(READ_VERSIONS))
    where = Path(root) / MANIFEST
    engines = data.get("engines")
    if not isinstance(engines, dict):
        raise UsageError(f"{where} is not a complete engines manifest: no \"engines\" table (rebuild with `koala-trt build`)")
    for name, entry in engines.items():
        missing = [k for k in ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise UsageError(f"{where} is not a complete engines manifest: engines.{name} has no "
                             f"{', '.join(repr(k) for k in missing)} (rebuild with `koala-trt build`)")
    return EnginesManifest(Path(root), data, EnginesRecord.from_json(data, str(where)))


def choose_library(engines_dir: Path | str) -> str:
    """Fix this process's TensorRT library to the one `engines_dir` was built with (engines/trt.use_library),
    before anything imports Polygraphy, which picks its library once per process on first import. Every
    path that runs engines (validate, generate, bench, serve, the TensorRT backend) calls this first.
    A library that cannot run here (not installed, no GPU) is not fixed: the backend then says what is
    missing, and this process stays free to build with either library (TensorRT-RTX builds on a CPU)."""
    from engines import trt
    from engines.build import missing_requirements
    from engines.libraries import library

    from engines.engine_set import is_engine_set, load_set

    if is_engine_set(Path(engines_dir)):  # a set of cards: their one library (a mixed set: chosen with the card)
        names = {card.compat.library.name for card in load_set(Path(engines_dir)).cards.values()}
        if len(names) != 1:
            return ""
        name = names.pop()
    else:
        name = load_engines_manifest(engines_dir).record.compat.library.name
    if not missing_requirements(library(name), run=True):
        trt.use_library(name)
    return name


def device_allowed(built_cc: str, hardware_compatibility: str, local_cc: str) -> bool:
    """Can a standard TensorRT engine built for built_cc with this compatibility level run on a local_cc
    GPU? (engines.compat.cc_allowed, the one rule; kept for engines/build.py's check_device.)"""
    return cc_allowed(Compat(Library("tensorrt", "0"), Targets((normalize_cc(built_cc),), hardware_compatibility)), local_cc)


def check_compatible(m: EnginesManifest, device: DeviceInfo, library_version: str | None) -> list[str]:
    """The runtime's check: refuse engines that cannot run on `device` with the manifest's library at
    `library_version` (KoalaError naming both and the exact rebuild command, engines.compat.engine_verdict
    deciding); return the warnings for combinations that load but are not what was built for."""
    compat = m.record.compat
    verdict = engine_verdict(compat, facts_for_device(device, compat.library.name, library_version))
    if verdict.problems:
        profile, note = None, ""
        if verdict.wrong_gpu:
            from engines.profile import profile_for_device

            match = profile_for_device(device.name, device.compute_capability)
            profile = match.name if match else f"sm{device.sm}.toml"
            if not match:
                note = (f" (no built-in profile fits this GPU: write sm{device.sm}.toml with [gpu] compute_capability = "
                        f"\"{device.compute_capability}\", starting from `koala-trt profiles show rtx3060ti`)")
        raise KoalaError(f"engines in {m.root} cannot run here: {'; '.join(verdict.problems)}. Rebuild them on this "
                         f"machine: {m.rebuild_command(profile)}{note}")
    return [f"engines in {m.root} were {w}; rebuild with: {m.rebuild_command()}" for w in verdict.warnings]


def inspect_engines(root: Path | str) -> dict[str, Any]:
    """What `koala-trt inspect ENGINES` shows: the library, targets, build host, refit flag and each
    engine with the LoRA adapters in its weights (read through the one reader)."""
    m = load_engines_manifest(root)
    r = m.record
    return {"engines_folder": str(root), **r.compat.to_json(),
            "refit": r.refit,
            "engines": {c: {"file": e.file, "bytes": e.bytes, "sha256": e.sha256,
                            "precision": m.entry(c).get("precision"), "loras": [a.to_json() for a in e.loras],
                            **({"refit": m.entry(c)["refit"]} if "refit" in m.entry(c) else {})}
                        for c, e in r.engines.items()}}
