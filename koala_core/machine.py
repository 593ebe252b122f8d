"""Facts about the machine a figure was measured on: CPU model, cores, flags, RAM, load average and
package versions. One helper for `koala-trt bench` and the scripts/ benchmarks (Linux /proc first,
the platform module as the fallback)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from pathlib import Path
from typing import Any

VERSION_PACKAGES = ("koala-trt", "numpy", "torch", "diffusers", "transformers", "onnx", "onnxruntime",
                    "onnxruntime-gpu", "openvino", "nvidia-modelopt", "tensorrt")
SIMD_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
# The CPU's BF16 matrix hardware, best first (Linux /proc/cpuinfo flag names). OpenVINO runs
# INFERENCE_PRECISION_HINT=bf16 natively on these; elsewhere it would emulate it (slower than FP32).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPU_PRECISIONS = ("auto", "fp32", "bf16")


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else platform.processor()."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD features relevant to GEMM speed that this CPU reports (subset of SIMD_FLAGS)."""
    flags = all_cpu_flags()
    return [f for f in SIMD_FLAGS if f in flags]


def all_cpu_flags() -> set[str]:
    """Every flag /proc/cpuinfo reports for the first CPU (empty where there is none)."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_isa(flags: set[str] | None = None) -> str:
    """The widest matrix/vector feature the CPU has, as one word for logs: amx_bf16, avx512_bf16,
    avx512f, avx2 or baseline."""
    flags = all_cpu_flags() if flags is None else flags
    return next((f for f in (*BF16_FLAGS, "avx512f", "avx2") if f in flags), "baseline")


def resolve_cpu_precision(choice: str | None, flags: set[str] | None = None) -> str:
    """--cpu-precision as used: auto (or None) is bf16 where the CPU has AMX-BF16 or AVX512-BF16, else
    fp32; bf16 on a CPU without either is a usage error naming the CPU's ISA (no silent emulation)."""
    from koala_core.errors import UsageError

    choice = "auto" if choice is None else choice
    if choice not in CPU_PRECISIONS:
        raise UsageError(f"--cpu-precision {choice!r}: expected one of {', '.join(CPU_PRECISIONS)}")
    flags = all_cpu_flags() if flags is None else flags
    has_bf16 = any(f in flags for f in BF16_FLAGS)
    if choice == "bf16" and not has_bf16:
        raise UsageError(f"--cpu-precision bf16: this CPU ({cpu_model()}, {cpu_isa(flags)}) has no AMX-BF16 or "
                         "AVX512-BF16; use fp32 or auto")
    if choice == "auto":
        return "bf16" if has_bf16 else "fp32"
    return choice


def cores() -> int:
    """CPUs this process may run on (the affinity mask), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ram_gib() -> float | None:
    """Total RAM (MemTotal) in GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def versions(packages: tuple[str, ...] = VERSION_PACKAGES) -> dict[str, str]:
    """Python's version and those of the installed packages among `packages` (missing ones left out)."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def machine_facts() -> dict[str, Any]:
    """Everything above in one dict, as benchmark JSON records it."""
    return {"cpu": cpu_model(), "cores": cores(), "simd": cpu_flags(), "ram_gib": ram_gib(),
            "os": platform.platform(), "load_average": load_average(), "versions": versions()}
