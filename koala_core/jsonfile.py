"""The JSON files koala-trt writes and reads (manifests, configs, reports): a missing or corrupt file
is one clear usage error, never a traceback; a written file appears complete or not at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from koala_core.errors import UsageError


def parse_json(raw: bytes | str, path: Path | str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is corrupt: {e}") from None


def write_json(path: Path, data: dict[str, Any], allow_nan: bool = True) -> None:
    """Write under a temporary name, then rename. allow_nan=False: strict JSON (reports for CI)."""
    from koala_core.atomic import staged_file

    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=allow_nan) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    """The parsed file; UsageError naming the path when it is missing or not valid JSON."""
    if not path.is_file():
        raise UsageError(f"missing file {path}")
    return parse_json(path.read_bytes(), path)


def read_folder_manifest(root: Path | str, filename: str, fmt: str, what: str, how: str,
                         max_version: int | None = None) -> dict[str, Any]:
    """ROOT/filename of a koala-trt folder (artifacts, engines, calibration set), checked for its
    `format` (and `format_version` at most max_version). `what` names the folder kind in messages,
    `how` says how to make one (e.g. "create one with `koala-trt export`")."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{what} folder {root} does not exist")
    path = root / filename
    if not path.is_file():
        raise UsageError(f"{root} is not a koala-trt {what} folder (no {filename}); {how}")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != fmt:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UsageError(f"{path} is not a koala-trt {what} manifest (format {got!r})")
    if max_version is not None and data.get("format_version", 0) > max_version:
        raise UsageError(f"{path} was written by a newer koala-trt (format version {data['format_version']})")
    return data
