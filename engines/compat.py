"""Can these engines run here? One rule for the runtime (engines/engine_manifest.check_compatible)
and for `koala-trt verify` (shipping/bundle.py): `engine_verdict(compat, facts)`, a pure function of the
engines' record (engines_record.Compat) and the facts about this machine (MachineFacts), fed by
whichever fact-gatherer is present (`gather_facts`: cuda-python, else nvidia-smi, else none).

The rules, from NVIDIA's documentation:

* Standard TensorRT, GPU. Without a hardware compatibility level a plan runs only on the compute
  capability it was built for; AMPERE_PLUS plans run on any sm_80 or later GPU;
  SAME_COMPUTE_CAPABILITY plans on any GPU of the build's compute capability (TensorRT developer
  guide, "Engine Compatibility" / "Hardware Compatibility",
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/advanced.html).
  Another card model of the same compute capability loads but its kernels were timed elsewhere: a
  warning when no compatibility level was asked for.
* Standard TensorRT, version. "By default, TensorRT engines are compatible only with the version of
  TensorRT used to build them" (same guide, "Version Compatibility"). The plan's version check
  compares the release, major.minor.patch (its error reads "expecting library version 8.0.0 got
  8.0.1"), so the fourth field, the package build number, may differ; a patch, minor or major
  difference is refused. Plans built VERSION_COMPATIBLE (from 8.6) load in the same or a later release
  of the same major version, and across the major versions NVIDIA names: 8 -> 9 and 8 -> 10 ("engines
  built with TensorRT 8 work with TensorRT 9 and TensorRT 10 runtimes", guide for 10.x) and 10 -> 11
  ("engines built with TensorRT 10 work with TensorRT 11", guide for 11.x); never an older runtime.
* TensorRT-RTX. An engine runs on the compute capabilities it was built for: a portable engine on
  any of its targets. "TensorRT-RTX engines are not compatible between different releases of
  TensorRT-RTX" (TensorRT-RTX developer guide, "Engine Compatibility",
  https://docs.nvidia.com/deeplearning/tensorrt-rtx/latest/inference-library/engine-compatibility.html):
  the version must equal the build's exactly (build number included: engines and the runtime cache are
  tied to it), else the engines are rebuilt.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from engines.cuda import DeviceInfo
from engines.engines_record import Compat, Library, normalize_cc
from engines.libraries import LIBRARIES, installed_version

MODULES = {name: lib.module for name, lib in LIBRARIES.items()}  # library name -> Python module
CROSS_MAJOR = {(8, 9), (8, 10), (10, 11)}  # (built, runtime) majors NVIDIA documents for version-compatible plans
VERSION_COMPATIBLE_SINCE = (8, 6, 0)


@dataclass(frozen=True)
class MachineFacts:
    """What this machine has: its GPUs (none: why_no_gpu says why) and the installed library versions
    (None: not installed). `source` names the gatherer: cuda-python, nvidia-smi, none or given."""

    gpus: tuple[DeviceInfo, ...]
    tensorrt: str | None = None
    tensorrt_rtx: str | None = None
    why_no_gpu: str = ""
    source: str = "given"

    def library_version(self, library: str) -> str | None:
        return self.tensorrt_rtx if library == "tensorrt-rtx" else self.tensorrt

    def to_json(self) -> dict[str, Any]:
        return {"gpus": [{"index": g.index, "name": g.name, "compute_capability": g.compute_capability,
                          "memory_bytes": g.memory_bytes} for g in self.gpus],
                "tensorrt_version": self.tensorrt, "tensorrt_rtx_version": self.tensorrt_rtx, "source": self.source,
                **({"why_no_gpu": self.why_no_gpu} if not self.gpus else {})}


@dataclass(frozen=True)
class Verdict:
    problems: list[str] = field(default_factory=list)  # empty: the engines can run here
    warnings: list[str] = field(default_factory=list)
    wrong_gpu: bool = False  # a problem is the GPU (not only the library), so another profile is needed

    @property
    def ok(self) -> bool:
        return not self.problems


def release(version: str) -> tuple[int, int, int]:
    """major.minor.patch of a version string ("10.8.0.43" -> (10, 8, 0)); the build number is dropped."""
    nums = []
    for part in str(version).strip().split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        nums.append(int(digits) if digits else 0)
    while len(nums) < 3:
        nums.append(0)
    return nums[0], nums[1], nums[2]


def sm(cc: str) -> str:
    return "sm_" + cc.replace(".", "")


def cc_allowed(compat: Compat, local_cc: str) -> bool:
    """May an engine of these targets run on a GPU of local_cc?"""
    local = normalize_cc(local_cc)
    if compat.library.name == "tensorrt":
        if compat.targets.hardware_compatibility == "ampere_plus":
            return release(local) >= (8, 0, 0)
        return local == compat.targets.compute_capabilities[0]  # none and same_compute_capability
    return local in compat.targets.compute_capabilities  # TensorRT-RTX: any of its targets


def version_problem(library: Library, version_compatible: bool, local: str | None) -> str | None:
    """Why engines built with `library` cannot load in the local release `local` (None: not installed), or None."""
    label, built = library.label, f"{library.label} {library.version}"
    if local is None:
        return (f"built with {built} but {label} is not installed here (no `{MODULES[library.name]}` Python module)")
    b, here = release(library.version), release(local)
    if library.name == "tensorrt-rtx":
        if library.version == local:  # exact: its engines and runtime cache are tied to the build's release
            return None
        why = "TensorRT-RTX engines load only in the TensorRT-RTX release that built them"
    elif version_compatible:
        later = here >= b and (here[0] == b[0] or (b[0], here[0]) in CROSS_MAJOR)
        if later and b >= VERSION_COMPATIBLE_SINCE:
            return None
        why = ("a version-compatible plan loads only in the same or a later TensorRT release of the same major version "
               "(or 8 -> 9/10, 10 -> 11)")
    else:
        if b == here:
            return None
        why = "a plan loads only in the TensorRT release (major.minor.patch) that built it"
    return f"built with {built}{' (version compatible)' if version_compatible else ''} but this machine has {label} {local}: {why}"


def _built_for(compat: Compat) -> str:
    t = compat.targets
    if compat.library.name == "tensorrt-rtx":
        return f"{', '.join(sm(c) for c in t.compute_capabilities)} (TensorRT-RTX targets)"
    name = compat.built_on.name if compat.built_on else "?"
    hc = f", hardware compatibility {t.hardware_compatibility}" if t.hardware_compatibility != "none" else ""
    return f"{name} ({sm(t.compute_capabilities[0])}{hc})"


def _here(gpus: tuple[DeviceInfo, ...]) -> str:
    if len(gpus) == 1:
        return f"this GPU is {gpus[0].name} ({sm(gpus[0].compute_capability)})"
    return "this machine's GPUs are " + ", ".join(f"GPU {g.index} {g.name} ({sm(g.compute_capability)})" for g in gpus)


def engine_verdict(compat: Compat, facts: MachineFacts) -> Verdict:
    """The one rule (module docstring): problems that stop these engines from running on this machine,
    and warnings for combinations that load but are not what was built for. Pure: no I/O."""
    if not facts.gpus:
        return Verdict([f"built for {_built_for(compat)}, but {facts.why_no_gpu or 'no NVIDIA GPU was found'}"], [], True)
    fit = [g for g in facts.gpus if cc_allowed(compat, g.compute_capability)]
    problems: list[str] = []
    if not fit:
        problems.append(f"built for {_built_for(compat)} but {_here(facts.gpus)}: {compat.library.label} engines do not "
                        "run on another compute capability")
    vp = version_problem(compat.library, compat.targets.version_compatible, facts.library_version(compat.library.name))
    if vp:
        problems.append(vp)
    warnings: list[str] = []
    built = compat.built_on
    if (fit and compat.library.name == "tensorrt" and compat.targets.hardware_compatibility == "none" and built
            and not any(g.name == built.name for g in fit)):
        warnings.append(f"built on {built.name}, this GPU is {fit[0].name} (same {sm(fit[0].compute_capability)}): "
                        "TensorRT does not promise speed or correctness across GPU models (its kernels were timed on "
                        "the build card)")
    return Verdict(problems, warnings, not fit)


def memory_problem(usable_bytes: int, gpu: DeviceInfo) -> str | None:
    """Why engines planned for a card with `usable_bytes` of device memory (its profile's memory less its
    reserve) may not fit `gpu`, or None: their shapes, residency and budgets were chosen for that much."""
    if gpu.memory_bytes <= 0 or usable_bytes <= gpu.memory_bytes:
        return None
    return (f"planned for {usable_bytes / (1 << 30):.1f} GiB of usable device memory but {gpu.name} has "
            f"{gpu.memory_bytes / (1 << 30):.1f} GiB")


def card_verdict(compat: Compat, usable_bytes: int, facts: MachineFacts) -> Verdict:
    """The one rule for a card of an engine set (engines/engine_set.py): `engine_verdict` (compute
    capability, library version) and the memory the card's engines were planned for, against the first
    GPU of `facts`. Pure: no I/O."""
    v = engine_verdict(compat, facts)
    mem = memory_problem(usable_bytes, facts.gpus[0]) if facts.gpus else None
    return v if mem is None else Verdict([*v.problems, mem], v.warnings, v.wrong_gpu)


def describe(compat: Compat) -> str:
    """One line for people: "TensorRT 10.8.0.43 on compute capability 8.9 (built on NVIDIA GeForce RTX 4090)"."""
    t = compat.targets
    hc = f", hardware compatibility {t.hardware_compatibility}" if t.hardware_compatibility != "none" else ""
    vc = ", version compatible" if t.version_compatible else ""
    host = compat.built_on.name if compat.built_on else "a CPU, no GPU"
    return (f"{compat.library.label} {compat.library.version} on compute capability "
            f"{', '.join(t.compute_capabilities)}{hc}{vc} (built on {host})")


# --- fact gatherers ----------------------------------------------------------------------------------
def gpus_from_cuda() -> tuple[tuple[DeviceInfo, ...], str]:
    """The GPUs cuda-python sees (engines/cuda.py), or () and why not."""
    from engines import cuda
    from koala_core.errors import KoalaError

    if not cuda.available():
        return (), "cuda-python is not installed"
    try:
        n = cuda.device_count()
        gpus = tuple(cuda.device_info(i) for i in range(n))
    except (KoalaError, OSError, RuntimeError) as e:
        return (), f"cuda-python failed ({e})"
    return gpus, ("" if gpus else "CUDA sees no GPU")


def gpus_from_nvidia_smi() -> tuple[tuple[DeviceInfo, ...], str]:
    """The GPUs nvidia-smi reports (index, name, compute capability, memory), or () and why not."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return (), "no NVIDIA GPU found on this machine (nvidia-smi is not installed)"
    try:
        r = subprocess.run([exe, "--query-gpu=index,name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return (), f"nvidia-smi failed ({e})"
    if r.returncode != 0:
        first = (r.stderr or r.stdout).strip().splitlines()[:1] or [f"exit {r.returncode}"]
        return (), f"nvidia-smi failed: {first[0]}"
    return parse_nvidia_smi(r.stdout)


def parse_nvidia_smi(text: str) -> tuple[tuple[DeviceInfo, ...], str]:
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            try:
                mem = int(float(parts[3]) * (1 << 20)) if parts[3].replace(".", "").isdigit() else 0
                gpus.append(DeviceInfo(parts[1], normalize_cc(parts[2]), mem, index=int(parts[0])))
            except ValueError:
                continue
    return tuple(gpus), ("" if gpus else "nvidia-smi lists no GPU")


def gather_facts() -> MachineFacts:
    """This machine's facts from the best gatherer present: cuda-python, else nvidia-smi, else none."""
    versions = {"tensorrt": installed_version("tensorrt"), "tensorrt_rtx": installed_version("tensorrt_rtx")}
    gpus, _ = gpus_from_cuda()
    if gpus:
        return MachineFacts(gpus, source="cuda-python", **versions)
    gpus, why = gpus_from_nvidia_smi()
    if gpus:
        return MachineFacts(gpus, source="nvidia-smi", **versions)
    return MachineFacts((), why_no_gpu=why, source="none", **versions)


def facts_for_device(device: DeviceInfo, library: str, version: str | None) -> MachineFacts:
    """The runtime's facts: the one GPU it opened and the version of the library it loaded."""
    key = "tensorrt_rtx" if library == "tensorrt-rtx" else "tensorrt"
    return MachineFacts((device,), source="cuda-python", **{key: version})
