"""bundle.json, the first member of a bundle (see shipping/bundle.py): format, runtime requirements,
and the sha256 and size of every file.

`BundleView` is its typed view: `read_bundle` reads every key `verify` and `unpack` use, once, and a
missing or renamed key is one BundleProblem naming the file and the field. `bundle_json` is the
writer (checked by the same reader first). json only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from koala_core.errors import KoalaError
from koala_core.schema import Fields, FileRecord, read_files

BUNDLE_MANIFEST = "bundle.json"
FORMAT = "koala-trt/bundle"
FORMAT_VERSION = 1
BACKENDS = ("onnxruntime", "tensorrt")


class BundleProblem(KoalaError):
    """The bundle is corrupt, incomplete, unsafe or not meant for this machine (exit 1)."""


@dataclass(frozen=True)
class ComponentRequirement:
    backend: str
    precision: str
    file: str  # the graph or the engine, relative to the bundle's root


@dataclass(frozen=True)
class Requirements:
    backend: str  # "onnxruntime" or "tensorrt" (when any component runs an engine)
    components: dict[str, ComponentRequirement]
    gpu: dict[str, Any] | None = None  # {name, compute_capability} of the engines' GPU (tensorrt)
    tensorrt_version: str | None = None  # the engines' TensorRT (tensorrt)
    doc: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # as written, for reports


@dataclass(frozen=True)
class BundleView:
    format_version: int
    requirements: Requirements
    files: dict[str, FileRecord]
    omitted: tuple[str, ...]  # graphs left out (--no-graphs): engines replace them


def _requirements(r: Fields) -> Requirements:
    backend = r.string("backend", required=True, choices=BACKENDS)
    comps = {n: ComponentRequirement(c.string("backend", required=True, choices=BACKENDS),
                                     c.string("precision", required=True), c.string("file", required=True))
             for n, c in r.tables("components").items()}
    gpu, trt = None, None
    if backend == "tensorrt" and "engine_set" in r.table:  # an engine set: per card (shipping.bundle.set_cards)
        r.table_of("engine_set", required=True)
    elif backend == "tensorrt" and "engines" in r.table:  # the engines' compatibility block (engines.engines_record)
        r.get("engines")
        if isinstance(r.table.get("gpu"), dict):
            gpu, trt = dict(r.table["gpu"]), str(r.table.get("tensorrt_version"))
    elif backend == "tensorrt":  # older bundles: the GPU and TensorRT version the engines were built with
        g = r.table_of("gpu", required=True)
        g.get("compute_capability", required=True)
        gpu = dict(g.table)
        v = r.get("tensorrt_version", required=True)
        trt = str(v)
    return Requirements(backend, comps, gpu, trt, dict(r.table))


def read_bundle(data: Any, where: str) -> BundleView:
    """The typed view of bundle.json; `where` (e.g. "B.tar.gz: bundle.json") starts every error."""
    top = Fields(where, data, error=BundleProblem)
    version = top.format(FORMAT, FORMAT_VERSION)
    files = read_files(top, required=True)
    if not files:
        raise top.err("files", "lists no files")
    return BundleView(version, _requirements(top.table_of("requirements", required=True)), files,
                      top.strings("omitted"))


def parse_bundle(raw: bytes, where: str) -> BundleView:
    """bundle.json's bytes, parsed and read; corrupt JSON is one BundleProblem too."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleProblem(f"{where} is corrupt ({e})") from None
    return read_bundle(data, where)


def bundle_json(data: dict[str, Any]) -> bytes:
    """The writer: bundle.json's bytes, after `read_bundle` accepted `data`."""
    read_bundle(data, BUNDLE_MANIFEST)
    return (json.dumps(data, indent=2) + "\n").encode()
