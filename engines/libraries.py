"""The two TensorRT libraries koala-trt builds with, and what each can and cannot do, answered
without importing either (so `build --dry-run`, `plan` and the refusals run anywhere).

- `tensorrt`: standard TensorRT, for the datacenter cards and Jetson. It builds on the GPU that will
  run the engine (tactics are timed there).
- `tensorrt-rtx`: NVIDIA's TensorRT for RTX (module `tensorrt_rtx`), for GeForce/RTX cards. Its
  ahead-of-time build needs no GPU once the target compute capabilities are given; the card
  JIT-compiles kernels at first run. It targets sm_75, sm_80, sm_86, sm_89, sm_120 and sm_121, not
  sm_87 (Jetson Orin) or sm_90 (H100). Refit (REFIT or REFIT_IDENTICAL), weight-stripped plans and
  the CURRENT capability need a GPU even to build; timing caches and hardware compatibility levels do not apply (TensorRT-RTX 1.7,
  checked on a CPU-only machine: see docs/profiles-and-build.md).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass

from koala_core.errors import UsageError


@dataclass(frozen=True)
class Library:
    name: str                       # as profiles and manifests spell it
    module: str                     # the Python module
    token: str                      # in engine file names: trt10.8.0.43, rtx1.7.1.116
    targets: tuple[str, ...] | None  # compute capabilities it can build for; None: any (built on the card)
    builds_without_gpu: bool
    install: str                    # how to get it
    weight_streaming_since: str = "10.0"  # the first version with BuilderFlag.WEIGHT_STREAMING

    def can_target(self, compute_capability: str) -> bool:
        return self.targets is None or compute_capability in self.targets

    def installed_version(self) -> str | None:
        """The installed version from package metadata, without importing the library."""
        return installed_version(self.module)


def installed_version(module: str) -> str | None:
    """The version of an installed Python module (tensorrt, tensorrt_rtx) from its distribution's metadata,
    without importing it (TensorRT's import loads its CUDA libraries); None when it is not installed."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    for dist in importlib.metadata.packages_distributions().get(module, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:  # no metadata (a tar-file install): ask the module
        mod = __import__(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "")) or None


TENSORRT = Library("tensorrt", "tensorrt", "trt",
                   None, False, "standard TensorRT, from NVIDIA's index: pip install 'koala-trt[gpu]'")
TENSORRT_RTX = Library("tensorrt-rtx", "tensorrt_rtx", "rtx",
                       ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1"), True,
                       "pip install tensorrt-rtx-cu12 (make install does)", "1.0")
LIBRARIES = {lib.name: lib for lib in (TENSORRT, TENSORRT_RTX)}

# TensorRT-RTX build options that need a GPU at build time (they fail with a Myelin CUDA error on a
# CPU-only machine, contrary to the docs), and options that do not apply to it.
# TensorRT-RTX 1.7 has refit (BuilderFlag.REFIT, Refitter, OnnxParserRefitter), but building a refittable
# engine needs the GPU: bare REFIT fails on a CPU-only machine with the same Myelin CUDA error (checked
# here on random:tiny's U-Net for sm_86). So koala-trt's TensorRT-RTX engines, built on a CPU, are never
# refittable: a LoRA reaches them by a rebuild from the patched folder (RTX_REFIT_REFUSAL).
RTX_NEEDS_GPU = {"refit_identical": "refit (REFIT_IDENTICAL + STRIP_PLAN)", "refit_weights": "refit (REFIT)"}
RTX_REFIT_REFUSAL = ("TensorRT-RTX engines are not refitted (TensorRT-RTX 1.7 builds refittable engines only on a GPU, "
                     "and koala-trt builds them on the CPU without refit)")
RTX_NOT_APPLICABLE = {
    "timing_cache": "TensorRT-RTX times no tactics at build time (kernels are compiled on the card at first run "
                    "and kept in its runtime cache)",
    "hardware_compatibility": "TensorRT-RTX engines run on the compute capabilities they were built for "
                              "(list them in build.targets)",
}


def library(name: str) -> Library:
    """The library by its profile name; an unknown one is a usage error naming the known ones."""
    if name not in LIBRARIES:
        raise UsageError(f"unknown TensorRT library {name!r}; known: {', '.join(LIBRARIES)}")
    return LIBRARIES[name]


def sm(compute_capability: str) -> str:
    """"8.6" -> "sm_86"."""
    return "sm_" + compute_capability.replace(".", "")


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def check_weight_streaming(lib: Library, version: str | None) -> None:
    """Weight streaming (BuilderFlag.WEIGHT_STREAMING) came with TensorRT 10.0 and is in every TensorRT-RTX:
    refuse an older library in one line (nothing to say while the library is not installed: a dry run)."""
    if version is None or _version_tuple(version) >= _version_tuple(lib.weight_streaming_since):
        return
    what = "TensorRT-RTX" if lib.name == "tensorrt-rtx" else "TensorRT"
    raise UsageError(f"weight streaming needs {what} {lib.weight_streaming_since} or newer (BuilderFlag.WEIGHT_STREAMING); "
                     f"this is {what} {version}: upgrade it, or drop build.weight_streaming / --weight-streaming")
