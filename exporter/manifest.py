"""DIR/manifest.json: what an artifact folder holds, written at export and read by every later step.

numpy/json only: the torch-free runtime reads it too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from exporter.specs import ComponentSpec, ShapeRange
from koala_core.jsonfile import read_folder_manifest, write_json
from koala_core.errors import UsageError

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
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def hash_tree(root: Path, skip: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under root (relative POSIX paths), manifest excluded."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in skip:
            out[rel] = file_record(p)
    return out


@dataclass
class Manifest:
    root: Path
    data: dict[str, Any]

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return self.data["components"]

    def spec(self, name: str) -> ComponentSpec:
        return ComponentSpec.from_json(self.component(name)["spec"])

    def specs(self) -> dict[str, ComponentSpec]:
        return {n: self.spec(n) for n in self.components}

    def component(self, name: str) -> dict[str, Any]:
        if name not in self.components:
            raise UsageError(f"{self.root} has no {name} (it holds {', '.join(self.components) or 'no components'})")
        return self.components[name]

    def onnx_path(self, name: str) -> Path:
        return self.root / self.component(name)["file"]

    def precision(self, name: str) -> str:
        return self.component(name).get("precision", "fp32")

    def shape_range(self, name: str) -> ShapeRange:
        return ShapeRange.from_json(self.component(name)["shape_range"])

    def save(self) -> None:
        write_json(self.root / MANIFEST, self.data)

    def rehash(self) -> None:
        self.data["files"] = hash_tree(self.root)

    def verify(self) -> Iterator[str]:
        """Problems with the folder's files against the recorded hashes, first to last."""
        for rel, meta in self.data.get("files", {}).items():
            p = self.root / rel
            if not p.is_file():
                yield f"missing file {rel}"
            elif p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
                yield f"{rel} does not match its sha256 in the manifest (changed or corrupt)"


def load_manifest(root: Path | str) -> Manifest:
    data = read_folder_manifest(root, MANIFEST, FORMAT, "artifacts", "create one with `koala-trt export`", FORMAT_VERSION)
    return Manifest(Path(root), data)
