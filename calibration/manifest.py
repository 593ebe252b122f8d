"""CALIB/manifest.json: a calibration set's settings and its shards (see calibration/dataset.py).

`CalibrationView` is its typed view: `read_calibration` reads every key a later step uses, once,
and a missing or renamed key is one error naming the file and the field. `write_calibration` is the
writer (checked by the same reader first). numpy-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from koala_core.jsonfile import read_folder_manifest, write_json
from koala_core.schema import Fields

CALIB_MANIFEST = "manifest.json"
CALIB_FORMAT = "koala-trt/calibration"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CalibrationSettings:
    """What the set was recorded with; a resumed `koala-trt calibrate` must ask for the same."""

    model: str
    config_sha256: dict[str, str]
    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class ShardRecord:
    """One shard-NNNNN.npz: one prompt's denoising trajectory."""

    file: str
    prompt_index: int
    prompt: str
    timesteps: tuple[float, ...]
    shapes: dict[str, tuple[int, ...]]  # array name -> shape as recorded
    sha256: str
    bytes: int


@dataclass(frozen=True)
class CalibrationView:
    format_version: int
    settings: CalibrationSettings
    shards: tuple[ShardRecord, ...]


def _shapes(f: Fields) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, v in f.mapping("shapes", required=True).items():
        if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
            raise f.err(f"shapes.{name}", f"must be a list of integers (got {v!r})")
        out[name] = tuple(v)
    return out


def _shard(f: Fields) -> ShardRecord:
    steps = f.get("timesteps", required=True)
    if not isinstance(steps, list) or any(isinstance(t, bool) or not isinstance(t, (int, float)) for t in steps):
        raise f.err("timesteps", f"must be a list of numbers (got {steps!r})")
    return ShardRecord(file=f.string("file", required=True), prompt_index=f.integer("prompt_index", required=True, lo=0),
                       prompt=f.string("prompt", required=True), timesteps=tuple(float(t) for t in steps),
                       shapes=_shapes(f), sha256=f.string("sha256", required=True),
                       bytes=f.integer("bytes", required=True, lo=0))


def read_calibration(data: Any, where: str) -> CalibrationView:
    """The typed view of a calibration manifest; `where` (its path) starts every error."""
    top = Fields(where, data)
    version = top.format(CALIB_FORMAT, FORMAT_VERSION)
    s = top.table_of("settings", required=True)
    settings = CalibrationSettings(
        model=s.string("model", required=True), config_sha256=s.mapping("config_sha256"),
        height=s.integer("height", required=True, lo=1), width=s.integer("width", required=True, lo=1),
        steps=s.integer("steps", required=True, lo=1), guidance=s.number("guidance", required=True),
        seed=s.integer("seed", required=True), prompts=s.strings("prompts", required=True))
    shards = top.get("shards", required=True)
    if not isinstance(shards, list):
        raise top.err("shards", f"must be a list (got {type(shards).__name__})")
    return CalibrationView(version, settings,
                           tuple(_shard(Fields(where, e, f"shards[{i}].")) for i, e in enumerate(shards)))


def write_calibration(root: Path, data: dict[str, Any]) -> None:
    """The writer: ROOT/manifest.json, atomically, after `read_calibration` accepted `data`."""
    read_calibration(data, str(Path(root) / CALIB_MANIFEST))
    write_json(Path(root) / CALIB_MANIFEST, data)


def load_calibration_manifest(root: Path | str) -> tuple[dict[str, Any], CalibrationView]:
    """The reader: the document and its view; one error naming the file and the field."""
    data = read_folder_manifest(root, CALIB_MANIFEST, CALIB_FORMAT, "calibration", "record one with `koala-trt calibrate`")
    return data, read_calibration(data, str(Path(root) / CALIB_MANIFEST))
