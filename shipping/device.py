"""This machine's NVIDIA GPUs and TensorRT version, and whether a bundle's engines can run here.

TensorRT plans are tied to the GPU's compute capability and, unless built version-compatible, to the
exact TensorRT release that built them (TensorRT developer guide, "Engine compatibility"); running
one elsewhere fails at deserialization or, worse, after a driver update. So verify compares both.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from shipping.engines_manifest import normalize_cc


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_capability: str  # "major.minor"


@dataclass(frozen=True)
class DeviceInfo:
    gpus: tuple[Gpu, ...]
    tensorrt_version: str | None
    why_no_gpu: str = ""  # set when gpus is empty

    def to_json(self) -> dict[str, Any]:
        return {"gpus": [{"index": g.index, "name": g.name, "compute_capability": g.compute_capability} for g in self.gpus],
                "tensorrt_version": self.tensorrt_version, **({"why_no_gpu": self.why_no_gpu} if not self.gpus else {})}


def local_gpus() -> tuple[tuple[Gpu, ...], str]:
    """GPUs that nvidia-smi reports (index, name, compute capability), or () and why not."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return (), "no NVIDIA GPU found on this machine (nvidia-smi is not installed)"
    try:
        r = subprocess.run([exe, "--query-gpu=index,name,compute_cap", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return (), f"nvidia-smi failed ({e})"
    if r.returncode != 0:
        return (), f"nvidia-smi failed: {(r.stderr or r.stdout).strip().splitlines()[:1] or ['exit ' + str(r.returncode)]}"
    gpus = []
    for line in r.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            try:
                gpus.append(Gpu(int(parts[0]), parts[1], normalize_cc(parts[2])))
            except ValueError:
                continue
    return tuple(gpus), ("" if gpus else "nvidia-smi lists no GPU")


def local_tensorrt_version() -> str | None:
    """The version of the `tensorrt` Python module, if it imports."""
    try:
        import tensorrt  # type: ignore[import-not-found]
    except Exception:  # absent, or present without its CUDA libraries
        return None
    return str(getattr(tensorrt, "__version__", "")) or None


def detect() -> DeviceInfo:
    gpus, why = local_gpus()
    return DeviceInfo(gpus, local_tensorrt_version(), why)


def _release(version: str) -> tuple[str, ...]:
    """major.minor.patch of a TensorRT version ("10.8.0.43" -> ("10", "8", "0"))."""
    return tuple(version.strip().split(".")[:3])


def engine_problems(gpu: dict[str, Any], tensorrt_version: str, device: DeviceInfo) -> tuple[list[str], list[str]]:
    """(problems, warnings) of running engines built on `gpu` with `tensorrt_version` on `device`.

    A problem: no GPU, no GPU of the same compute capability, no TensorRT, another TensorRT release.
    A warning: same compute capability but another card model (TensorRT allows it, tactics were
    timed on the build card, so speed may differ)."""
    want_cc, want_name = normalize_cc(gpu["compute_capability"]), str(gpu.get("name", "?"))
    built = f"built for compute capability {want_cc} ({want_name}) with TensorRT {tensorrt_version}"
    if not device.gpus:
        return [f"engines {built}, but {device.why_no_gpu or 'no NVIDIA GPU was found'}; "
                "use `verify --no-device-check` to check integrity only"], []
    same = [g for g in device.gpus if g.compute_capability == want_cc]
    if not same:
        here = ", ".join(f"GPU {g.index} {g.name} (compute capability {g.compute_capability})" for g in device.gpus)
        return [f"engines {built}, but this machine has {here}: TensorRT engines do not run on another compute capability; "
                "rebuild them here with `koala-trt build`"], []
    problems: list[str] = []
    if device.tensorrt_version is None:
        problems.append(f"engines {built}, but TensorRT is not installed here (the `tensorrt` Python module does not import)")
    elif _release(device.tensorrt_version) != _release(tensorrt_version):
        problems.append(f"engines {built}, but this machine has TensorRT {device.tensorrt_version}: "
                        "a plan only loads in the TensorRT release that built it; install that release or rebuild")
    warnings = []
    if not any(g.name == want_name for g in same):
        warnings.append(f"engines were built on {want_name}; this machine's {same[0].name} has the same compute capability, "
                        "so they load, but kernels were timed on the build card")
    return problems, warnings
