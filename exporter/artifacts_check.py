"""Check the artifact files a run will read against the manifest before anything runs.

Hashing every graph (5 s for KOALA-700M) is taken off a warm start by a record of what was verified:
VERIFIED in the artifacts folder lists, per file, the sha256 it was found to have and the file's
stamp then (size, mtime, ctime, inode). A file whose stamp still matches and whose manifest sha256 is
the one verified is not hashed again; any rewrite changes its mtime and ctime (ctime cannot be set
back from user space), so a tampered or corrupt file is hashed, and refused, before it runs.
`--verify` (record=False) hashes everything; `--no-verify` (full_hash=False) checks sizes only. The
record guards against corruption and stray edits, not against someone who can also rewrite the
manifest and the record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from exporter.manifest import VERIFIED, Manifest, sha256_file
from koala_core.errors import UsageError


def file_stamp(path: Path) -> list[int]:
    """[bytes, mtime_ns, ctime_ns, inode] of `path`: what a verified sha256 is keyed by."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_record(root: Path) -> dict[str, Any]:
    try:
        files = json.loads((root / VERIFIED).read_text(encoding="utf-8"))["files"]
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_record(root: Path, files: dict[str, Any]) -> None:
    from koala_core.atomic import staged_file

    try:
        with staged_file(root / VERIFIED) as tmp:
            tmp.write_text(json.dumps({"format": "koala-trt/verified", "files": dict(sorted(files.items()))}, indent=1),
                           encoding="utf-8")
    except (OSError, UsageError):  # a read-only artifacts folder: every start hashes, as before
        pass


def check_files(m: Manifest, prefixes: list[str], full_hash: bool = True, record: bool = False,
                hashed: list[int] | None = None) -> int:
    """Every manifest-listed file under `prefixes` (e.g. "unet/", "tokenizer/") exists with its recorded
    size and (with full_hash) sha256; raises UsageError naming the first bad one. Returns bytes checked.
    record: trust, and keep, the folder's VERIFIED record (see the module's docstring); `hashed` (a
    one-item list) receives the bytes actually hashed."""
    files = m.view.files
    if not files:
        raise UsageError(f"{m.root}/manifest.json lists no files: re-export the artifacts with `koala-trt export`")
    checked = done = 0
    for p in prefixes:
        if not any(rel.startswith(p) for rel in files):
            raise UsageError(f"{m.root}/manifest.json lists no files under {p} (incomplete artifacts folder)")
    verified = _read_record(m.root) if record and full_hash else {}
    changed = False
    for rel, meta in files.items():
        if not any(rel.startswith(p) for p in prefixes):
            continue
        path = m.root / rel
        if not path.is_file():
            raise UsageError(f"missing artifact file {path}")
        if path.stat().st_size != meta.bytes:
            raise UsageError(f"{path} is corrupt: {path.stat().st_size:,} bytes, the manifest records {meta.bytes:,}")
        checked += meta.bytes
        if not full_hash:
            continue
        stamp = file_stamp(path)
        seen = verified.get(rel)
        if record and isinstance(seen, dict) and seen.get("stamp") == stamp and seen.get("sha256") == meta.sha256:
            continue
        done += meta.bytes
        if sha256_file(path) != meta.sha256:
            raise UsageError(f"{path} is corrupt: its sha256 does not match the manifest")
        if record:
            verified[rel], changed = {"sha256": meta.sha256, "stamp": stamp}, True
    if changed:
        _write_record(m.root, verified)
    if hashed is not None:
        hashed[:] = [done]
    return checked
