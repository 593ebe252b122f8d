"""Reading a parsed document (TOML profile, JSON manifest) field by field: every error is one line
naming the file and the field, raised where the field is read. The typed views of koala-trt's
on-disk formats (engines/profile.py, exporter/manifest.py, calibration/manifest.py,
shipping/bundle_manifest.py) are built on this reader, so a renamed or missing key fails there,
never as a KeyError further on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from koala_core.errors import KoalaError, UsageError

Triple = tuple[int, int, int]


class Fields:
    """One table of a document: `where` names the file, `prefix` the table's path ("" at the top,
    "components.unet." below). Errors are `error(f"{where}: field {prefix}{key} {what}")`."""

    def __init__(self, where: str, table: Any, prefix: str = "", error: type[KoalaError] = UsageError) -> None:
        if not isinstance(table, Mapping):
            raise error(f"{where}: field {prefix.rstrip('.') or 'top level'} must be a table")
        self.where, self.table, self.prefix, self.error, self.used = where, table, prefix, error, set()

    def err(self, key: str, what: str) -> KoalaError:
        return self.error(f"{self.where}: field {self.prefix}{key} {what}")

    def get(self, key: str, default: Any = None, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.table:
            if required:
                raise self.err(key, "is required")
            return default
        return self.table[key]

    def string(self, key: str, default: str | None = None, choices: tuple[str, ...] | None = None,
               required: bool = False) -> str:
        v = self.get(key, default, required)
        if not isinstance(v, str):
            raise self.err(key, f"must be a string (got {v!r})")
        if choices and v not in choices:
            raise self.err(key, f"must be one of {', '.join(choices)} (got {v!r})")
        return v

    def optional_string(self, key: str) -> str | None:
        """A string, or None when the field is absent or null."""
        v = self.get(key)
        if v is not None and not isinstance(v, str):
            raise self.err(key, f"must be a string (got {v!r})")
        return v

    def boolean(self, key: str, default: bool) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self.err(key, f"must be true or false (got {v!r})")
        return v

    def number(self, key: str, default: float | None = None, lo: float = 0.0, required: bool = False,
               positive: bool = False) -> float:
        v = self.get(key, default, required)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.err(key, f"must be a number (got {v!r})")
        if v < lo or (positive and v <= 0):
            raise self.err(key, f"must be {'positive' if positive else f'at least {lo}'} (got {v!r})")
        return float(v)

    def integer(self, key: str, default: int | None = None, lo: int | None = None, hi: int | None = None,
                required: bool = False) -> int:
        v = self.get(key, default, required)
        bad = isinstance(v, bool) or not isinstance(v, int)
        if bad or (lo is not None and v < lo) or (hi is not None and v > hi):
            if lo is not None and hi is not None:
                raise self.err(key, f"must be an integer {lo}..{hi} (got {v!r})")
            if lo is not None:
                raise self.err(key, f"must be an integer of at least {lo} (got {v!r})")
            raise self.err(key, f"must be an integer (got {v!r})")
        return v

    def triple(self, key: str, default: Triple, multiple: int = 1) -> Triple:
        v = self.get(key, default)
        if isinstance(v, int) and not isinstance(v, bool):
            v = (v, v, v)
        if (not isinstance(v, (list, tuple)) or len(v) != 3
                or any(isinstance(x, bool) or not isinstance(x, int) for x in v)):
            raise self.err(key, f"must be an integer or a list [min, opt, max] of integers (got {v!r})")
        lo, opt, hi = v
        if lo < 1 or not lo <= opt <= hi:
            raise self.err(key, f"must satisfy 1 <= min <= opt <= max (got {list(v)})")
        if any(x % multiple for x in v):
            raise self.err(key, f"must be multiples of {multiple} (got {list(v)})")
        return (lo, opt, hi)

    def strings(self, key: str, default: list[str] | None = None, required: bool = False) -> tuple[str, ...]:
        v = self.get(key, default if default is not None else [], required)
        if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
            raise self.err(key, f"must be a list of strings (got {v!r})")
        return tuple(v)

    def mapping(self, key: str, required: bool = False) -> dict[str, Any]:
        """A table taken as it is (a copy), {} when absent or null and not required."""
        v = self.get(key, None, required)
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise self.err(key, f"must be a table (got {v!r})")
        return dict(v)

    def table_of(self, key: str, required: bool = False) -> "Fields":
        v = self.get(key, None, required)
        return Fields(self.where, {} if v is None else v, f"{self.prefix}{key}.", self.error)

    def tables(self, key: str, required: bool = False) -> dict[str, "Fields"]:
        """A table of tables (`components`, `files`): each entry's reader, by name."""
        outer = self.table_of(key, required)
        return {name: outer.table_of(name) for name in outer.table}

    def format(self, fmt: str, version: int) -> int:
        """The document's `format` must be `fmt` and its `format_version` an integer 1..version;
        returns the version."""
        got = self.get("format", required=True)
        if got != fmt:
            raise self.err("format", f"must be {fmt!r} (got {got!r})")
        v = self.get("format_version", required=True)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise self.err("format_version", f"must be an integer from 1 to {version} (got {v!r})")
        if v > version:
            raise self.err("format_version", f"is {v}: written by a newer koala-trt (this one reads {fmt} "
                           f"up to version {version}); upgrade koala-trt")
        return v

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.err(unknown[0], "is not a known field (check its spelling)")


@dataclass(frozen=True)
class FileRecord:
    """One file's entry in a manifest's "files" (or a calibration shard): its sha256 and size."""

    sha256: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes}

    @staticmethod
    def read(f: Fields) -> "FileRecord":
        return FileRecord(f.string("sha256", required=True), f.integer("bytes", required=True, lo=0))


def read_files(f: Fields, key: str = "files", required: bool = False) -> dict[str, FileRecord]:
    """A table {relative path: {sha256, bytes}}."""
    return {rel: FileRecord.read(t) for rel, t in f.tables(key, required).items()}


@dataclass(frozen=True)
class AdapterRecord:
    """One LoRA adapter's entry under a manifest's "loras" (artifacts and engines manifests alike):
    the file's name and sha256, the scale it was fused at, its layout and the layers it adapts per
    component. Two adapters are the same when file content and scale are (`key`)."""

    file: str
    sha256: str
    scale: float
    format: str = "peft"
    layers: dict[str, int] | None = None  # component -> layers adapted

    @property
    def key(self) -> tuple[str, float]:
        return (self.sha256, self.scale)

    def label(self) -> str:
        return f"{self.file} x{self.scale:g} (sha256 {self.sha256[:12]})"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "scale": self.scale, "format": self.format,
                "layers": dict(self.layers or {})}

    def only(self, component: str) -> "AdapterRecord | None":
        """This adapter as one component's engine carries it: its layers there, or None when it adapts none."""
        n = (self.layers or {}).get(component, 0)
        return AdapterRecord(self.file, self.sha256, self.scale, self.format, {component: n}) if n else None

    @staticmethod
    def read(f: Fields) -> "AdapterRecord":
        layers = f.mapping("layers")
        for comp, n in layers.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise f.err(f"layers.{comp}", f"must be a layer count (got {n!r})")
        return AdapterRecord(f.string("file", required=True), f.string("sha256", required=True),
                             f.number("scale", required=True, lo=float("-inf")), f.string("format", "peft"), layers)


def read_adapters(f: Fields, key: str = "loras") -> tuple[AdapterRecord, ...]:
    """A list of adapter records ({} entries read by AdapterRecord.read); () when absent."""
    v = f.get(key, [])
    if not isinstance(v, list):
        raise f.err(key, f"must be a list of adapter records (got {v!r})")
    return tuple(AdapterRecord.read(Fields(f.where, item, f"{f.prefix}{key}[{i}].", f.error)) for i, item in enumerate(v))
