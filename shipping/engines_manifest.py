"""The few keys shipping reads from an ENGINES/manifest.json written by `koala-trt build`.

All key names live here, so a change in the build's manifest is one edit in this module. Read:

    format              == "koala-trt/engines"
    gpu.name            the card the engines were built on ("NVIDIA GeForce RTX 4090")
    gpu.compute_capability   "8.9" (also accepted: "sm_89", 89, [8, 9])
    tensorrt            "10.8.0.43" (the TensorRT version the engines were built with)
    engines.<component>.file / .sha256 / .bytes   the plan file (relative to ENGINES) and its hash

Nothing else in that manifest is interpreted; it is copied into a bundle verbatim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from koala_core.errors import UsageError
from koala_core.jsonfile import parse_json, read_folder_manifest

MANIFEST = "manifest.json"
FORMAT_KEY, FORMAT = "format", "koala-trt/engines"
GPU_KEY, GPU_NAME_KEY, GPU_CC_KEY = "gpu", "name", "compute_capability"
TRT_VERSION_KEY = "tensorrt"
ENGINES_KEY, FILE_KEY, SHA256_KEY, BYTES_KEY = "engines", "file", "sha256", "bytes"


@dataclass(frozen=True)
class EngineFile:
    component: str
    file: str  # relative to the engines folder, POSIX
    sha256: str
    bytes: int


@dataclass(frozen=True)
class EnginesInfo:
    root: Path
    gpu_name: str
    compute_capability: str  # "major.minor"
    tensorrt_version: str
    engines: dict[str, EngineFile]


def normalize_cc(value: Any) -> str:
    """A compute capability as "major.minor" from "8.9", "sm_89", "sm89", 89, 8.9 or [8, 9]."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{int(value[0])}.{int(value[1])}"
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


def parse_engines_manifest(data: dict[str, Any], root: Path, where: str) -> EnginesInfo:
    """Read the documented keys; any problem is one UsageError naming the key."""
    if data.get(FORMAT_KEY) != FORMAT:
        raise UsageError(f"{where} is not a koala-trt engines manifest ({FORMAT_KEY} {data.get(FORMAT_KEY)!r}, expected {FORMAT!r})")
    try:
        gpu = data[GPU_KEY]
        name, cc = str(gpu[GPU_NAME_KEY]), normalize_cc(gpu[GPU_CC_KEY])
        trt = str(data[TRT_VERSION_KEY])
        entries = data[ENGINES_KEY]
        engines = {}
        for comp, e in entries.items():
            rel = str(e[FILE_KEY])
            if not safe_relpath(rel):
                raise UsageError(f"{where}: engine file {rel!r} of {comp} is not a relative path inside the engines folder")
            engines[comp] = EngineFile(comp, rel, str(e[SHA256_KEY]), int(e[BYTES_KEY]))
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{where} lacks or garbles a required key ({e}); needed: {FORMAT_KEY}, {GPU_KEY}.{GPU_NAME_KEY}, "
                         f"{GPU_KEY}.{GPU_CC_KEY}, {TRT_VERSION_KEY}, {ENGINES_KEY}.<component>.{{{FILE_KEY},{SHA256_KEY},{BYTES_KEY}}}") from None
    if not engines:
        raise UsageError(f"{where} lists no engines")
    return EnginesInfo(root, name, cc, trt, engines)


def load_engines_manifest(root: Path | str) -> tuple[EnginesInfo, bytes]:
    """The parsed keys and the manifest's raw bytes (copied verbatim into bundles)."""
    root = Path(root)
    read_folder_manifest(root, MANIFEST, FORMAT, "engines", "create one with `koala-trt build`")
    raw = (root / MANIFEST).read_bytes()
    return parse_engines_manifest(parse_json(raw, root / MANIFEST), root, str(root / MANIFEST)), raw
