"""Check the artifact files a run will read against the manifest before anything runs."""

from __future__ import annotations

from exporter.manifest import Manifest, sha256_file
from koala_core.errors import UsageError


def check_files(m: Manifest, prefixes: list[str], full_hash: bool = True) -> int:
    """Every manifest-listed file under `prefixes` (e.g. "unet/", "tokenizer/") exists with its recorded
    size and (with full_hash) sha256; raises UsageError naming the first bad one. Returns bytes checked."""
    files = m.view.files
    if not files:
        raise UsageError(f"{m.root}/manifest.json lists no files: re-export the artifacts with `koala-trt export`")
    checked = 0
    for p in prefixes:
        if not any(rel.startswith(p) for rel in files):
            raise UsageError(f"{m.root}/manifest.json lists no files under {p} (incomplete artifacts folder)")
    for rel, meta in files.items():
        if not any(rel.startswith(p) for p in prefixes):
            continue
        path = m.root / rel
        if not path.is_file():
            raise UsageError(f"missing artifact file {path}")
        if path.stat().st_size != meta.bytes:
            raise UsageError(f"{path} is corrupt: {path.stat().st_size:,} bytes, the manifest records {meta.bytes:,}")
        if full_hash and sha256_file(path) != meta.sha256:
            raise UsageError(f"{path} is corrupt: its sha256 does not match the manifest")
        checked += meta.bytes
    return checked
