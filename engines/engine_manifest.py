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
from engines.cuda import DeviceInfo
from exporter.specs import ComponentSpec, ShapeRange
from koala_core.errors import KoalaError, UsageError
from koala_core.jsonfile import read_folder_manifest

MANIFEST = "manifest.json"
FORMAT = "koala-trt/engines"
FORMAT_VERSION = 1


def _vtuple(v: str) -> tuple[int, ...]:
    out = []
    for part in str(v).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


@dataclass
class EnginesManifest:
    root: Path
    data: dict[str, Any]

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

    def rebuild_command(self, profile: str | None = None) -> str:
        args = dict(self.data.get("build", {}).get("args", {}))
        if profile:
            args["profile"] = profile
        return build_command(args, self.root)


ENTRY_KEYS = ("file", "spec", "shape_range", "inputs")  # what the runtime reads of each engine


def load_engines_manifest(root: Path | str) -> EnginesManifest:
    data = read_folder_manifest(root, MANIFEST, FORMAT, "engines", "create one with `koala-trt build`", FORMAT_VERSION)
    where = Path(root) / MANIFEST
    engines = data.get("engines")
    if not isinstance(engines, dict):
        raise UsageError(f"{where} is not a complete engines manifest: no \"engines\" table (rebuild with `koala-trt build`)")
    for name, entry in engines.items():
        missing = [k for k in ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise UsageError(f"{where} is not a complete engines manifest: engines.{name} has no "
                             f"{', '.join(repr(k) for k in missing)} (rebuild with `koala-trt build`)")
    return EnginesManifest(Path(root), data)


def device_allowed(built_cc: str, hardware_compatibility: str, local_cc: str) -> bool:
    """Can an engine built for built_cc with this compatibility level run on a local_cc GPU?"""
    if hardware_compatibility == "ampere_plus":
        return _vtuple(local_cc) >= (8, 0)
    return local_cc == built_cc  # none and same_compute_capability


def trt_allowed(built: str, version_compatible: bool, local: str) -> bool:
    """Plans load only in the TensorRT version that built them, unless built VERSION_COMPATIBLE,
    which later TensorRT runtimes accept."""
    if version_compatible:
        return _vtuple(local) >= _vtuple(built)
    return _vtuple(local) == _vtuple(built)


def check_compatible(m: EnginesManifest, device: DeviceInfo, trt_version: str) -> list[str]:
    """Refuse engines built for another card or TensorRT version (KoalaError naming both and the exact
    rebuild command); return warnings for combinations that load but are not what was built for."""
    d = m.data
    gpu, flags = d.get("gpu", {}), d.get("flags", {})
    built_cc, built_trt = str(gpu.get("compute_capability", "?")), str(d.get("tensorrt", "?"))
    hc, vc = flags.get("hardware_compatibility", "none"), bool(flags.get("version_compatible", False))
    problems = []
    if not device_allowed(built_cc, hc, device.compute_capability):
        problems.append(f"built for {gpu.get('name', '?')} (sm_{built_cc.replace('.', '')}"
                        f"{', hardware compatibility ' + hc if hc != 'none' else ''}) but this GPU is "
                        f"{device.name} (sm_{device.sm})")
    if not trt_allowed(built_trt, vc, trt_version):
        problems.append(f"built with TensorRT {built_trt}{' (version compatible)' if vc else ''} but this "
                        f"machine has TensorRT {trt_version}")
    if problems:
        profile, note = None, ""
        if not device_allowed(built_cc, hc, device.compute_capability):
            from engines.profile import profile_for_device

            match = profile_for_device(device.name, device.compute_capability)
            profile = match.name if match else f"sm{device.sm}.toml"
            if not match:
                note = (f" (no built-in profile fits this GPU: write sm{device.sm}.toml with [gpu] compute_capability = "
                        f"\"{device.compute_capability}\", starting from `koala-trt profiles show rtx3060ti`)")
        raise KoalaError(f"engines in {m.root} cannot run here: {'; '.join(problems)}. Rebuild them on this "
                         f"machine: {m.rebuild_command(profile)}{note}")
    warnings = []
    if hc == "none" and gpu.get("name") and gpu.get("name") != device.name:
        warnings.append(f"engines in {m.root} were built on {gpu['name']}, this GPU is {device.name} (same "
                        f"sm_{device.sm}): TensorRT does not promise speed or correctness across GPU models; "
                        f"rebuild with: {m.rebuild_command()}")
    return warnings
