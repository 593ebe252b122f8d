"""The one reader of ENGINES/manifest.json's typed part: which library built the engines, which GPUs
they target, the host that built them, and the plan files. Every other module (the runtime, `pack`,
`verify`, `triton`) reads these keys through `EnginesRecord.from_json`, so a renamed key fails here,
once, with the file and the key named.

Two layouts are read (`format_version`):

    1  "gpu": {"name", "compute_capability", "memory_bytes"}, "tensorrt": "10.8.0.43",
       "cuda": {"runtime", "driver"}, "flags": {"hardware_compatibility", "version_compatible"}
       -> library tensorrt, targets [gpu.compute_capability], build_host.gpu = gpu
    2  "library": {"name": "tensorrt" | "tensorrt-rtx", "version"},
       "targets": {"compute_capabilities": [...], "hardware_compatibility", "version_compatible"},
       "build_host": {"gpu": null | {"name", "compute_capability", "memory_bytes"}, "cpu", "cuda": null | {...}}

Both: "format": "koala-trt/engines", "engines": {<component>: {"file", "sha256", "bytes", ...}}, and
optionally per engine "loras": the LoRA adapters fused into the weights it was built (or refitted)
from, as koala_core.schema.AdapterRecord (absent before koala-trt recorded them: read as none); an
engine built streamable also has "weight_streaming": {"budget_bytes": int | null, "from": ...} (absent
or null: not streamable).
Nothing else is interpreted here; bundles copy the manifest verbatim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from engines.cuda import DeviceInfo
from engines.profile import REFIT_FLAGS
from koala_core.errors import UsageError
from koala_core.schema import AdapterRecord, Fields, read_adapters

FORMAT = "koala-trt/engines"
READ_VERSIONS = (1, 2)
LIBRARIES = ("tensorrt", "tensorrt-rtx")
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
RECORDED_REFIT = tuple(REFIT_FLAGS.values())  # what a build records as flags.refit (engines/profile.py)


def normalize_cc(value: Any) -> str:
    """A compute capability as "major.minor" from "8.9", "sm_89", "sm89", 89, 8.9 or [8, 9]."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{int(value[0])}.{int(value[1])}"
    if isinstance(value, bool):
        raise ValueError(f"not a compute capability: {value!r}")
    if isinstance(value, int):
        return f"{value // 10}.{value % 10}"
    s = str(value).strip().lower()
    if m := re.fullmatch(r"(\d+)\.(\d+)", s):
        return f"{int(m[1])}.{int(m[2])}"
    if m := re.fullmatch(r"sm_?(\d+)", s):
        return normalize_cc(int(m[1]))
    raise ValueError(f"not a compute capability: {value!r}")


def safe_relpath(rel: str) -> bool:
    """A relative POSIX path that stays inside its folder (no absolute path, no `..`, no backslash)."""
    if not rel or "\\" in rel or "\x00" in rel or rel.startswith("/"):
        return False
    parts = PurePosixPath(rel).parts
    return bool(parts) and all(p not in ("", ".", "..") for p in parts) and "/".join(parts) == rel


@dataclass(frozen=True)
class Library:
    name: str  # "tensorrt" | "tensorrt-rtx"
    version: str  # "10.8.0.43" | "1.7.1.116"

    @property
    def label(self) -> str:
        return "TensorRT-RTX" if self.name == "tensorrt-rtx" else "TensorRT"


@dataclass(frozen=True)
class Targets:
    compute_capabilities: tuple[str, ...]  # "major.minor", at least one
    hardware_compatibility: str = "none"
    version_compatible: bool = False


@dataclass(frozen=True)
class EngineFile:
    component: str
    file: str  # relative to the engines folder, POSIX
    sha256: str
    bytes: int
    loras: tuple[AdapterRecord, ...] = ()  # the LoRA adapters in its weights, in order
    streamable: bool = False  # built with WEIGHT_STREAMING
    streaming_budget_bytes: int | None = None  # weights kept on the device; None: TensorRT's automatic budget


def _labels(adapters: tuple[AdapterRecord, ...]) -> str:
    return " + ".join(a.label() for a in adapters) or "none"


def adapter_mismatch(engines: dict[str, EngineFile], artifacts: dict[str, tuple[AdapterRecord, ...]],
                     where: str = "the engines") -> str | None:
    """One line naming every engine whose LoRA adapters (sha256 and scale; fused in any order) are not
    those of the artifacts' weights for its component (`artifacts`: component -> adapters, see
    exporter.manifest.ArtifactsView.adapters), or None when they agree."""
    diffs = []
    for comp, e in engines.items():
        mine, theirs = artifacts.get(comp, ()), e.loras
        if sorted(a.key for a in mine) != sorted(a.key for a in theirs):
            diffs.append(f"{comp} engine has {_labels(theirs)}, the artifacts' {comp} has {_labels(mine)}")
    if not diffs:
        return None
    return (f"LoRA adapters differ between {where} and the artifacts: {'; '.join(diffs)}; rebuild the engines from "
            "the artifacts (koala-trt build), or refit refittable TensorRT engines (koala-trt refit)")


@dataclass(frozen=True)
class Compat:
    """What decides where the engines may run: the library, the targets, the card that built them."""

    library: Library
    targets: Targets
    built_on: DeviceInfo | None = None  # None: built without a GPU (TensorRT-RTX on a CPU)

    def to_json(self) -> dict[str, Any]:
        g = self.built_on
        return {"library": {"name": self.library.name, "version": self.library.version},
                "targets": {"compute_capabilities": list(self.targets.compute_capabilities),
                            "hardware_compatibility": self.targets.hardware_compatibility,
                            "version_compatible": self.targets.version_compatible},
                "built_on": None if g is None else {"name": g.name, "compute_capability": g.compute_capability}}

    @classmethod
    def from_json(cls, d: Any, where: str) -> Compat:
        """The block `to_json` writes (bundle.json's requirements.engines)."""
        r = _Reader(where)
        lib, tg = r.obj(d, "library"), r.obj(d, "targets")
        built = r.get(d, "built_on")
        return cls(r.library(lib), r.targets(tg, "targets"),
                   None if built is None else DeviceInfo(r.str(r.obj(d, "built_on"), "name", "built_on"),
                                                         r.cc(built, "compute_capability", "built_on"), 0))


@dataclass(frozen=True)
class BuildHost:
    gpu: DeviceInfo | None  # the GPU the build ran on (memory_bytes; driver/runtime from cuda), or None
    cpu: str | None = None
    cuda: dict[str, str] | None = None  # {"runtime", "driver"} or None


@dataclass(frozen=True)
class EnginesRecord:
    format_version: int
    library: Library
    targets: Targets
    build_host: BuildHost
    engines: dict[str, EngineFile] = field(default_factory=dict)
    refit: str = "none"  # flags.refit: "none" | "REFIT_IDENTICAL+STRIP_PLAN" | "REFIT" (refittable with other weights)

    @property
    def compat(self) -> Compat:
        return Compat(self.library, self.targets, self.build_host.gpu)

    @classmethod
    def from_json(cls, data: Any, where: str) -> EnginesRecord:
        """Read either layout; any missing, renamed or garbled key is one UsageError naming `where` and the key."""
        r = _Reader(where)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise UsageError(f"{where} is not a koala-trt engines manifest (format {got!r}, expected {FORMAT!r})")
        version = data.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise UsageError(f"{where}: format_version {version!r} is not an integer")
        if version > max(READ_VERSIONS):
            raise UsageError(f"{where} was written by a newer koala-trt (format version {version}); upgrade koala-trt")
        if version not in READ_VERSIONS:
            raise UsageError(f"{where}: unknown format_version {version} (this koala-trt reads {READ_VERSIONS})")
        if version == 1:
            for new in ("library", "targets", "build_host"):
                if new in data:
                    raise UsageError(f"{where}: key {new!r} belongs to format_version 2 but the file says format_version 1")
            gpu = r.obj(data, "gpu")
            cuda = data.get("cuda")
            host_gpu = r.gpu(gpu, "gpu", cuda if isinstance(cuda, dict) else None)
            flags = data.get("flags") or {}
            if not isinstance(flags, dict):
                raise UsageError(f"{where}: key 'flags' must be an object")
            lib = Library("tensorrt", r.str(data, "tensorrt"))
            targets = r.targets({"compute_capabilities": [host_gpu.compute_capability],
                                 "hardware_compatibility": flags.get("hardware_compatibility", "none"),
                                 "version_compatible": flags.get("version_compatible", False)}, "flags")
            host = BuildHost(host_gpu, None, r.cuda(cuda, "cuda"))
        else:
            for old in ("gpu", "tensorrt"):
                if old in data:
                    raise UsageError(f"{where}: key {old!r} is format_version 1's; format_version 2 has "
                                     f"{'build_host.gpu' if old == 'gpu' else 'library.version'}")
            lib = r.library(r.obj(data, "library"))
            targets = r.targets(r.obj(data, "targets"), "targets")
            bh = r.obj(data, "build_host")
            cuda = r.get(bh, "cuda", "build_host")
            g = r.get(bh, "gpu", "build_host")
            host_gpu = None if g is None else r.gpu(r.obj(bh, "gpu", "build_host"), "build_host.gpu",
                                                    cuda if isinstance(cuda, dict) else None)
            cpu = r.get(bh, "cpu", "build_host")
            host = BuildHost(host_gpu, None if cpu is None else str(cpu), r.cuda(cuda, "build_host.cuda"))
        entries = r.obj(data, "engines")
        engines: dict[str, EngineFile] = {}
        for comp, e in entries.items():
            at = f"engines.{comp}"
            if not isinstance(e, dict):
                raise UsageError(f"{where}: key {at!r} must be an object")
            rel = r.str(e, "file", at)
            if not safe_relpath(rel):
                raise UsageError(f"{where}: engine file {rel!r} of {comp} is not a relative path inside the engines folder")
            sha, size = r.str(e, "sha256", at), r.get(e, "bytes", at)
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise UsageError(f"{where}: key '{at}.bytes' must be a byte count (got {size!r})")
            ws = e.get("weight_streaming")
            if ws is not None:
                budget = ws.get("budget_bytes") if isinstance(ws, dict) else "?"
                if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
                    raise UsageError(f"{where}: key '{at}.weight_streaming.budget_bytes' must be a byte count or null "
                                     f"(got {budget!r})")
            engines[comp] = EngineFile(comp, rel, sha, size, read_adapters(Fields(where, e, f"{at}.", UsageError)),
                                       ws is not None, None if ws is None else ws.get("budget_bytes"))
        if not engines:
            raise UsageError(f"{where} lists no engines")
        flags = data.get("flags") or {}
        refit = flags.get("refit", "none") if isinstance(flags, dict) else "none"
        if refit not in RECORDED_REFIT:
            raise UsageError(f"{where}: key 'flags.refit' is {refit!r}, expected one of {', '.join(RECORDED_REFIT)}")
        return cls(version, lib, targets, host, engines, refit)


class _Reader:
    """Key access that names the file and the dotted key on every failure."""

    def __init__(self, where: str) -> None:
        self.where = where

    def _key(self, key: str, at: str) -> str:
        return f"{at}.{key}" if at else key

    def get(self, d: Any, key: str, at: str = "") -> Any:
        if not isinstance(d, dict) or key not in d:
            raise UsageError(f"{self.where} lacks key {self._key(key, at)!r}")
        return d[key]

    def obj(self, d: Any, key: str, at: str = "") -> dict[str, Any]:
        v = self.get(d, key, at)
        if not isinstance(v, dict):
            raise UsageError(f"{self.where}: key {self._key(key, at)!r} must be an object (got {type(v).__name__})")
        return v

    def str(self, d: Any, key: str, at: str = "") -> str:
        v = self.get(d, key, at)
        if not isinstance(v, (str, int, float)) or isinstance(v, bool) or str(v) == "":
            raise UsageError(f"{self.where}: key {self._key(key, at)!r} must be a non-empty string (got {v!r})")
        return str(v)

    def cc(self, d: Any, key: str, at: str = "") -> str:
        v = self.get(d, key, at)
        try:
            return normalize_cc(v)
        except (ValueError, TypeError):
            raise UsageError(f"{self.where}: key {self._key(key, at)!r} is not a compute capability (got {v!r})") from None

    def gpu(self, d: dict[str, Any], at: str, cuda: dict[str, Any] | None) -> DeviceInfo:
        mem = d.get("memory_bytes", 0)
        return DeviceInfo(self.str(d, "name", at), self.cc(d, "compute_capability", at),
                          int(mem) if isinstance(mem, int) else 0,
                          str((cuda or {}).get("driver", "")), str((cuda or {}).get("runtime", "")))

    def cuda(self, v: Any, at: str) -> dict[str, str] | None:
        if v is None:
            return None
        if not isinstance(v, dict):
            raise UsageError(f"{self.where}: key {at!r} must be an object or null")
        return {k: str(x) for k, x in v.items()}

    def library(self, d: dict[str, Any]) -> Library:
        name = self.str(d, "name", "library")
        if name not in LIBRARIES:
            raise UsageError(f"{self.where}: key 'library.name' is {name!r}, expected one of {', '.join(LIBRARIES)}")
        return Library(name, self.str(d, "version", "library"))

    def targets(self, d: dict[str, Any], at: str) -> Targets:
        ccs = self.get(d, "compute_capabilities", at) if at == "targets" else d["compute_capabilities"]
        if not isinstance(ccs, list) or not ccs:
            raise UsageError(f"{self.where}: key '{at}.compute_capabilities' must be a non-empty list")
        out = []
        for i, v in enumerate(ccs):
            try:
                out.append(normalize_cc(v))
            except (ValueError, TypeError):
                raise UsageError(f"{self.where}: key '{at}.compute_capabilities[{i}]' is not a compute capability ({v!r})") from None
        hc = self.get(d, "hardware_compatibility", at) if at == "targets" else d["hardware_compatibility"]
        if hc not in HARDWARE_COMPATIBILITY:
            raise UsageError(f"{self.where}: key '{at}.hardware_compatibility' is {hc!r}, expected one of "
                             f"{', '.join(HARDWARE_COMPATIBILITY)}")
        vc = self.get(d, "version_compatible", at) if at == "targets" else d["version_compatible"]
        if not isinstance(vc, bool):
            raise UsageError(f"{self.where}: key '{at}.version_compatible' must be true or false (got {vc!r})")
        return Targets(tuple(out), hc, vc)
