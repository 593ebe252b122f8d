"""DIR/manifest.json: what an artifact folder holds, written at export and read by every later step.

`ArtifactsView` is its typed view: every key a later step reads is read once, in `read_artifacts`,
and a missing or renamed key is one error naming the file and the field there. `Manifest` holds the
document for the steps that write it (export, convert, quantize); `Manifest.save` checks it with the
same reader before writing. numpy/json only: the torch-free runtime reads it too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from exporter.specs import ComponentSpec, ShapeRange
from koala_core.errors import UsageError
from koala_core.jsonfile import read_folder_manifest, write_json
from koala_core.schema import AdapterRecord, Fields, FileRecord, read_adapters, read_files

MANIFEST = "manifest.json"
FORMAT = "koala-trt/artifacts"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """A file's entry in the manifest's "files": sha256 and size."""
    return FileRecord(sha256_file(path), path.stat().st_size).to_json()


VERIFIED = ".koala-verified.json"  # the record of verified files (exporter/artifacts_check.py): never an artifact


def hash_tree(root: Path, skip: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under root (relative POSIX paths), manifest and record of
    verified files excluded."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in skip and rel != VERIFIED:
            out[rel] = file_record(p)
    return out


@dataclass(frozen=True)
class ComponentRecord:
    """One entry of the manifest's "components"."""

    file: str  # the graph, relative to the folder
    spec: ComponentSpec
    precision: str = "fp32"
    shape_range: ShapeRange | None = None
    parameters: int | None = None
    export: dict[str, Any] | None = None  # export settings and figures (absent in hand-made folders)
    check: dict[str, Any] | None = None  # the export's ONNX Runtime vs PyTorch check
    conversion: dict[str, Any] | None = None  # what convert / quantize did to the graph


@dataclass(frozen=True)
class SourceRecord:
    model: str
    config_sha256: dict[str, str]
    controlnet: str | None = None  # export --controlnet, as exporter.sources.resolve_recorded takes it


@dataclass(frozen=True)
class ArtifactsView:
    format_version: int
    source: SourceRecord
    components: dict[str, ComponentRecord]
    files: dict[str, FileRecord]
    tokenizers: tuple[str, ...]
    scheduler: str
    sampler: dict[str, Any]
    vae: dict[str, Any]
    opset: int | None
    versions: dict[str, Any]
    export: dict[str, Any]
    variant: dict[str, Any]  # convert / quantize: what the variant is ({} for an export)
    loras: tuple[AdapterRecord, ...] = ()  # LoRA adapters fused into the weights, in order (export --lora, koala-trt lora)

    def adapters(self, component: str) -> tuple[AdapterRecord, ...]:
        """The adapters that change `component`'s weights, as its engine records them."""
        return tuple(a for a in (x.only(component) for x in self.loras) if a is not None)


def _parsed(f: Fields, key: str, parse: Any) -> Any:
    try:
        return parse(f.mapping(key, required=True))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise f.err(key, f"is malformed ({type(e).__name__}: {e})") from None


def _component(c: Fields) -> ComponentRecord:
    rng = c.get("shape_range")
    return ComponentRecord(
        file=c.string("file", required=True), spec=_parsed(c, "spec", ComponentSpec.from_json),
        precision=c.string("precision", "fp32"),
        shape_range=None if rng is None else _parsed(c, "shape_range", ShapeRange.from_json),
        parameters=c.integer("parameters", required=True, lo=0) if "parameters" in c.table else None,
        export=c.mapping("export") if "export" in c.table else None,
        check=c.mapping("check") if c.get("check") is not None else None,
        conversion=c.mapping("conversion") if "conversion" in c.table else None)


def read_artifacts(data: Any, where: str) -> ArtifactsView:
    """The typed view of an artifacts manifest; `where` (its path) starts every error."""
    top = Fields(where, data)
    version = top.format(FORMAT, FORMAT_VERSION)
    src = top.table_of("source", required=True)
    opset = top.get("opset")
    if opset is not None:
        opset = top.integer("opset", lo=1)
    return ArtifactsView(
        format_version=version,
        source=SourceRecord(src.string("model", required=True), src.mapping("config_sha256"), src.get("controlnet")),
        components={n: _component(c) for n, c in top.tables("components", required=True).items()},
        files=read_files(top), tokenizers=top.strings("tokenizers", required=True),
        scheduler=top.string("scheduler", required=True), sampler=top.mapping("sampler"), vae=top.mapping("vae"),
        opset=opset, versions=top.mapping("versions"), export=top.mapping("export"), variant=top.mapping("variant"),
        loras=read_adapters(top))


@dataclass
class Manifest:
    """The folder and its manifest document: `view` for reading, `data` for the steps that write it."""

    root: Path
    data: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.root / MANIFEST

    @property
    def view(self) -> ArtifactsView:
        return read_artifacts(self.data, str(self.path))

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        """The components' entries as a document (for the steps that rewrite them); read through
        `record(name)` or `view.components`."""
        return self.data["components"]

    def record(self, name: str) -> ComponentRecord:
        """The typed entry of one component; UsageError when the folder does not hold it."""
        comps = self.view.components
        if name not in comps:
            raise UsageError(f"{self.root} has no {name} (it holds {', '.join(comps) or 'no components'})")
        return comps[name]

    def component(self, name: str) -> dict[str, Any]:
        """One component's entry as a document, for a step that rewrites it (convert, quantize)."""
        self.record(name)
        return self.components[name]

    def spec(self, name: str) -> ComponentSpec:
        return self.record(name).spec

    def specs(self) -> dict[str, ComponentSpec]:
        return {n: c.spec for n, c in self.view.components.items()}

    def onnx_path(self, name: str) -> Path:
        return self.root / self.record(name).file

    def precision(self, name: str) -> str:
        return self.record(name).precision

    def shape_range(self, name: str) -> ShapeRange:
        rng = self.record(name).shape_range
        if rng is None:
            raise UsageError(f"{self.path}: field components.{name}.shape_range is required")
        return rng

    def save(self) -> None:
        """Write the manifest (checked by the reader first: nothing is written that would not load)."""
        write_artifacts(self.root, self.data)

    def rehash(self) -> None:
        self.data["files"] = hash_tree(self.root)

    def verify(self) -> Iterator[str]:
        """Problems with the folder's files against the recorded hashes, first to last."""
        for rel, meta in self.view.files.items():
            p = self.root / rel
            if not p.is_file():
                yield f"missing file {rel}"
            elif p.stat().st_size != meta.bytes or sha256_file(p) != meta.sha256:
                yield f"{rel} does not match its sha256 in the manifest (changed or corrupt)"


def write_artifacts(root: Path, data: dict[str, Any]) -> None:
    """The writer: ROOT/manifest.json, atomically, after `read_artifacts` accepted `data`."""
    read_artifacts(data, str(Path(root) / MANIFEST))
    write_json(Path(root) / MANIFEST, data)


def load_manifest(root: Path | str) -> Manifest:
    """The reader: ROOT/manifest.json, checked field by field (one error naming the file and the field)."""
    data = read_folder_manifest(root, MANIFEST, FORMAT, "artifacts", "create one with `koala-trt export`")
    m = Manifest(Path(root), data)
    m.view
    return m
