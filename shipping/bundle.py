"""Bundles: one .tar.gz that carries an artifacts folder (manifest, ONNX graphs, tokenizers,
scheduler config), optionally the engines of a `koala-trt build` folder, and `bundle.json`: the
runtime requirements and the sha256 of every file.

Layout (inside the archive and after `unpack`; the root is an ordinary artifacts folder):

    bundle.json            first member: format, requirements, files {path: {sha256, bytes}}
    manifest.json          the artifacts manifest, verbatim
    text_encoder/model.onnx, unet/model.onnx(.data), tokenizer/..., scheduler/...
    engines/manifest.json  the engines manifest, verbatim (engine bundles only)
    engines/<plan files>

Everything streams: files are hashed and copied in chunks, never read whole, so GB-sized external
data and engines need no more memory than a small file. Archives are read with Python's tarfile in
stream mode; unpack accepts regular files with safe relative names only, applies tarfile's `data`
extraction filter on top, checks each file's size and sha256 as it writes it, and renames the
folder into place only when everything checked out.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable

from exporter.manifest import FORMAT as ARTIFACTS_FORMAT, MANIFEST, load_manifest, read_artifacts
from koala_core import __version__
from koala_core.atomic import staged_dir, staged_file
from koala_core.errors import KoalaError, UsageError
from koala_core.schema import FileRecord
from koala_core.run_settings import progress_enabled
from engines.compat import MachineFacts, engine_verdict, gather_facts
from engines.cuda import DeviceInfo
from engines.engine_manifest import FORMAT as ENGINES_FORMAT, MANIFEST as ENGINES_MANIFEST_NAME
from engines.engine_manifest import load_engines_manifest
from engines.engines_record import Compat, EnginesRecord, Library, Targets, adapter_mismatch, normalize_cc, safe_relpath
from engines import engine_set as es
from shipping.bundle_manifest import (BUNDLE_MANIFEST, FORMAT, FORMAT_VERSION, BundleProblem, BundleView, bundle_json,
                                      parse_bundle)

__all__ = ["BUNDLE_MANIFEST", "FORMAT", "FORMAT_VERSION", "BundleProblem", "PackResult", "Report", "pack", "plan_bundle",
           "unpack", "verify"]

ENGINES_DIR = "engines"
ENGINES_MANIFEST = f"{ENGINES_DIR}/{ENGINES_MANIFEST_NAME}"
SET_INDEX = f"{ENGINES_DIR}/{es.INDEX}"  # an engine set: engines/engines-index.json and engines/<card>/...
CHUNK = 4 << 20
IO_BLOCK = 1 << 20  # tarfile's stream block: equal read/write sizes keep its buffer slicing linear
MAX_JSON_BYTES = 64 << 20  # bundle.json and the two manifests are read into memory: bound them
LOUD_BYTES = 256 << 20  # files at least this big get a progress line

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# ----------------------------------------------------------------------------------------------
# pack
# ----------------------------------------------------------------------------------------------
@dataclass
class _Item:
    name: str  # path in the bundle
    src: Path
    sha256: str
    bytes: int
    raw: bytes | None = None  # written from memory (an engine set's sub-index for pack --card), not from src


@dataclass
class PackResult:
    path: Path
    archive_bytes: int
    archive_sha256: str
    files: int
    data_bytes: int
    requirements: dict[str, Any]
    omitted: list[str] = field(default_factory=list)


class _HashingReader(io.RawIOBase):
    """Reads a file in chunks for tarfile while hashing what passes through."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        b = self.f.read(size if size is not None and size >= 0 else CHUNK)
        self.h.update(b)
        self.n += len(b)
        return b


class _HashingWriter(io.RawIOBase):
    """Writes the archive to disk while hashing it, so its sha256 costs no second read."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _graph_files(files: dict[str, Any], graph: str) -> list[str]:
    """A component's graph and its external data: every listed file in the graph's folder."""
    folder = PurePosixPath(graph).parent.as_posix()
    if folder in ("", "."):
        return [graph]
    return [rel for rel in files if rel.startswith(folder + "/")]


def engines_requirements(record: EnginesRecord) -> dict[str, Any]:
    """bundle.json's requirements for engines: `engines` (Compat.to_json, what verify checks) and, for
    standard TensorRT, the `gpu` and `tensorrt_version` keys that bundles before it carried."""
    compat = record.compat
    out: dict[str, Any] = {"engines": compat.to_json()}
    if compat.library.name == "tensorrt" and compat.built_on is not None:
        out.update(gpu={"name": compat.built_on.name, "compute_capability": compat.targets.compute_capabilities[0]},
                   tensorrt_version=compat.library.version)
    return out


def requirements_compat(req: dict[str, Any], where: str) -> Compat:
    """The engines' Compat from bundle.json's requirements (older bundles: gpu + tensorrt_version)."""
    if "engines" in req:
        return Compat.from_json(req["engines"], f"{where} requirements.engines")
    try:
        cc = normalize_cc(req["gpu"]["compute_capability"])
        return Compat(Library("tensorrt", str(req["tensorrt_version"])), Targets((cc,)),
                      DeviceInfo(str(req["gpu"].get("name", "?")), cc, 0))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UsageError(f"{where} requirements lack engines, or gpu.compute_capability and tensorrt_version") from None


def device_problem(req: dict[str, Any], facts: MachineFacts, where: str = BUNDLE_MANIFEST) -> tuple[str | None, list[str]]:
    """verify's device check: (the one-line problem or None, warnings) of running the engines that
    bundle.json's requirements describe on a machine with these facts (engines.compat.engine_verdict)."""
    verdict = engine_verdict(requirements_compat(req, where), facts)
    warnings = [f"engines were {w}" for w in verdict.warnings]
    if verdict.ok:
        return None, warnings
    hint = ("use `verify --no-device-check` to check integrity only" if not facts.gpus
            else "rebuild them for this machine with `koala-trt build` (the engines manifest records its build.args)")
    return f"the bundle's engines cannot run here: {'; '.join(verdict.problems)}; {hint}", warnings


def plan_bundle(artifacts: Path, engines: Path | None, graphs: bool = True,
                cards: list[str] | None = None) -> tuple[dict[str, Any], list[_Item]]:
    """bundle.json's content and the files to pack, checked for completeness (names and sizes)
    before anything is written; hashes come from the manifests and are re-checked while packing.
    `engines` may be an engine set (engines/engine_set.py): every card, or only `cards` (pack --card)."""
    if cards and (engines is None or not es.is_engine_set(engines)):
        raise UsageError("--card picks cards of an engine set: pass the set with --engines (a folder with "
                         f"{es.INDEX})")
    if engines is not None and es.is_engine_set(engines):
        return _plan_set_bundle(artifacts, Path(engines), graphs, cards)
    info = load_engines_manifest(engines).record if engines is not None else None
    engines_raw = (engines / ENGINES_MANIFEST_NAME).read_bytes() if engines is not None else b""  # copied verbatim
    if not graphs and info is None:
        raise UsageError("--no-graphs needs --engines: without engines the graphs are what runs")
    m, items, omitted = _artifact_items(artifacts, list(info.engines) if info is not None and not graphs else [])
    view = m.view
    if info is not None:
        unknown = [c for c in info.engines if c not in m.components]
        if unknown:
            raise UsageError(f"{engines} has engines for {', '.join(unknown)}, which {artifacts} does not hold: "
                             "pack engines with the artifacts they were built from")

    comps: dict[str, dict[str, Any]] = {}
    for name in m.components:
        comps[name] = {"backend": "onnxruntime", "precision": m.precision(name), "file": m.record(name).file}
    requirements: dict[str, Any] = {"backend": "onnxruntime", "components": comps, "onnx_opset": view.opset,
                                    "onnxruntime_checked_with": view.versions.get("onnxruntime")}
    if info is not None:
        assert engines is not None
        items.append(_Item(ENGINES_MANIFEST, engines / ENGINES_MANIFEST_NAME, _sha256_bytes(engines_raw), len(engines_raw)))
        for comp, e in info.engines.items():
            p = engines / e.file
            if not p.is_file():
                raise UsageError(f"{engines} is incomplete: engine {e.file} of {comp} is missing")
            if p.stat().st_size != e.bytes:
                raise UsageError(f"{p} has {p.stat().st_size} bytes, the engines manifest says {e.bytes} (changed or corrupt)")
            name = f"{ENGINES_DIR}/{e.file}"
            items.append(_Item(name, p, e.sha256, e.bytes))
            comps[comp] = {"backend": "tensorrt", "precision": m.precision(comp), "file": name}
        requirements.update(backend="tensorrt", **engines_requirements(info))

    data = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "koala_trt_version": __version__,
            "source": {"model": view.source.model, "artifacts_manifest_sha256": items[0].sha256},
            "requirements": requirements, "omitted": omitted,
            "files": {it.name: {"sha256": it.sha256, "bytes": it.bytes} for it in items}}
    return data, items


def _artifact_items(artifacts: Path, omitted_for: list[str]) -> tuple[Any, list[_Item], list[str]]:
    """The artifacts manifest, its files to pack (less the graphs of `omitted_for`) and those left out."""
    m = load_manifest(artifacts)
    files = m.view.files
    if not files:
        raise UsageError(f"{artifacts}/{MANIFEST} lists no files; re-export the folder")
    raw = (artifacts / MANIFEST).read_bytes()
    items = [_Item(MANIFEST, artifacts / MANIFEST, _sha256_bytes(raw), len(raw))]
    omitted = [rel for comp in omitted_for if comp in m.components for rel in _graph_files(files, m.record(comp).file)]
    for rel, meta in files.items():
        if not safe_relpath(rel) or rel in (BUNDLE_MANIFEST, MANIFEST) or rel.split("/")[0] == ENGINES_DIR:
            raise UsageError(f"{artifacts}/{MANIFEST} lists {rel!r}, which cannot go into a bundle "
                             f"(unsafe path, or a name the bundle reserves: {BUNDLE_MANIFEST}, {ENGINES_DIR}/)")
        if rel in omitted:
            continue
        p = artifacts / rel
        if not p.is_file():
            raise UsageError(f"{artifacts} is incomplete: {rel} (listed in {MANIFEST}) is missing")
        if p.stat().st_size != meta.bytes:
            raise UsageError(f"{artifacts}/{rel} has {p.stat().st_size} bytes, {MANIFEST} says {meta.bytes} (changed or corrupt)")
        items.append(_Item(rel, p, meta.sha256, meta.bytes))
    return m, items, omitted


def _plan_set_bundle(artifacts: Path, engines: Path, graphs: bool, cards: list[str] | None) -> tuple[dict[str, Any], list[_Item]]:
    """plan_bundle for an engine set: engines/engines-index.json (only the cards packed) and every packed
    card's folder under engines/<card>/; requirements.engine_set lists what each card needs."""
    eset = es.load_set(engines)
    names = list(eset.cards)
    if cards:
        unknown = [c for c in cards if c not in eset.cards]
        if unknown:
            raise UsageError(f"--card {unknown[0]}: the engine set {engines} has {', '.join(names)}")
        if len(set(cards)) != len(cards):
            raise UsageError(f"--card lists {next(c for c in cards if cards.count(c) > 1)} twice")
        names = list(cards)
    records: dict[str, EnginesRecord] = {}
    for n in names:
        card = eset.cards[n]
        problem = es.card_problem(engines, card)
        if problem:
            raise es.CorruptSet(f"{engines / es.INDEX} does not match its files: {problem} (changed or corrupt); rebuild "
                                f"the card with `koala-trt build`")
        records[n] = EnginesRecord.from_json(json.loads((engines / card.path / ENGINES_MANIFEST_NAME).read_bytes()),
                                             str(engines / card.path / ENGINES_MANIFEST_NAME))
    if not graphs:
        everywhere = [c for c in records[names[0]].engines if all(c in r.engines for r in records.values())]
    m, items, omitted = _artifact_items(artifacts, everywhere if not graphs else [])
    for n, r in records.items():
        unknown = [c for c in r.engines if c not in m.components]
        if unknown:
            raise UsageError(f"{engines / n} has engines for {', '.join(unknown)}, which {artifacts} does not hold: "
                             "pack engines with the artifacts they were built from")
    data = eset.data if names == list(eset.cards) else {
        **eset.data, "cards": {n: eset.data["cards"][n] for n in names},
        "summary": [r for r in eset.data.get("summary", []) if r.get("card") in names]}
    index_raw = (engines / es.INDEX).read_bytes() if names == list(eset.cards) else (json.dumps(data, indent=2) + "\n").encode()
    items.append(_Item(SET_INDEX, engines / es.INDEX, _sha256_bytes(index_raw), len(index_raw), index_raw))
    for n in names:
        for rel, meta in eset.cards[n].files.items():
            items.append(_Item(f"{ENGINES_DIR}/{rel}", engines / rel, meta["sha256"], meta["bytes"]))
    comps: dict[str, dict[str, Any]] = {c: {"backend": "onnxruntime", "precision": m.precision(c), "file": m.record(c).file}
                                        for c in m.components}
    for c in records[names[0]].engines:
        if all(c in r.engines for r in records.values()):
            comps[c] = {"backend": "tensorrt", "precision": m.precision(c),
                        "file": f"{ENGINES_DIR}/{eset.cards[names[0]].path}/{records[names[0]].engines[c].file}"}
    requirements: dict[str, Any] = {
        "backend": "tensorrt", "components": comps, "onnx_opset": m.view.opset,
        "onnxruntime_checked_with": m.view.versions.get("onnxruntime"),
        "engine_set": {"index": SET_INDEX, "cards": {n: {"path": f"{ENGINES_DIR}/{eset.cards[n].path}",
                                                          "gpu": eset.cards[n].gpu, **eset.cards[n].compat.to_json()}
                                                      for n in names}}}
    data_out = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "koala_trt_version": __version__,
                "source": {"model": m.view.source.model, "artifacts_manifest_sha256": items[0].sha256},
                "requirements": requirements, "omitted": omitted,
                "files": {it.name: {"sha256": it.sha256, "bytes": it.bytes} for it in items}}
    return data_out, items


def set_cards(req: dict[str, Any], where: str) -> es.EngineSet:
    """The engine set bundle.json's requirements.engine_set describes (paths inside the bundle)."""
    cards = {}
    try:
        for n, c in req["engine_set"]["cards"].items():
            compat = Compat.from_json(c, f"{where} requirements.engine_set.cards.{n}")
            cards[n] = es.Card(n, str(c["path"]), compat, dict(c["gpu"]), {}, "", c)
            cards[n].usable_bytes  # noqa: B018  # the gpu block has its memory
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UsageError(f"{where} requirements.engine_set is incomplete (cards with path, gpu, library, targets)") from None
    if not cards:
        raise UsageError(f"{where} requirements.engine_set lists no cards")
    return es.EngineSet(Path(ENGINES_DIR), cards, req["engine_set"])


def set_device_problem(req: dict[str, Any], facts: MachineFacts, where: str = BUNDLE_MANIFEST) -> tuple[str | None, str | None]:
    """verify's device check of an engine-set bundle: (the one-line problem or None, the folder that would
    be used, e.g. engines/rtx4090), chosen as `--engines` on this machine chooses (engines.engine_set)."""
    eset = set_cards(req, where)
    card, verdicts = es.choose_card(eset, facts)
    if card is None:
        hint = ("use `verify --no-device-check` to check integrity only" if not facts.gpus
                else "build the set for this machine's card with `koala-trt build`")
        return f"{es.none_fits(eset, facts, verdicts, 'the bundle' + chr(39) + 's engine set')}; {hint}", None
    return None, card.path


def _legacy_view(req: dict[str, Any], compat: Compat) -> Compat:
    """compat as an older bundle.json (gpu + tensorrt_version, no engines block) could record it."""
    if "engines" in req:
        return compat
    g = compat.built_on
    return Compat(Library(compat.library.name, compat.library.version), Targets(compat.targets.compute_capabilities[:1]),
                  None if g is None else DeviceInfo(g.name, g.compute_capability, 0))


def _tarinfo(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.type = size, int(mtime), 0o644, tarfile.REGTYPE
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def pack(artifacts: Path, out: Path, engines: Path | None = None, graphs: bool = True, level: int = 1,
         force: bool = False, log: Log = _quiet, cards: list[str] | None = None) -> PackResult:
    """Write BUNDLE.tar.gz from an artifacts folder (and an engines folder); atomic: the archive
    appears only when every file was streamed and matched its manifest's sha256."""
    if Path(out).exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it")
    if Path(out).is_dir():
        raise UsageError(f"{out} is a folder; --out names the archive file to write (BUNDLE.tar.gz)")
    if not 0 <= level <= 9:
        raise UsageError(f"--level must be 0..9 (got {level})")
    data, items = plan_bundle(Path(artifacts), Path(engines) if engines else None, graphs, cards)
    header = bundle_json(data)
    total = sum(it.bytes for it in items)
    log(f"packing {len(items)} files ({_gb(total)}) into {out}")
    with staged_file(Path(out)) as tmp:
        with open(tmp, "wb") as raw:
            sink = _HashingWriter(raw)
            with gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=level, mtime=0) as gz:  # type: ignore[arg-type]
                with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT, bufsize=IO_BLOCK) as tar:
                    tar.copybufsize = IO_BLOCK  # tarfile's defaults (10-16 KiB) cost a Python call per block
                    tar.addfile(_tarinfo(BUNDLE_MANIFEST, len(header), time.time()), io.BytesIO(header))
                    for it in items:
                        if it.bytes >= LOUD_BYTES and progress_enabled():
                            log(f"  {it.name} ({_gb(it.bytes)})")
                        with (io.BytesIO(it.raw) if it.raw is not None else open(it.src, "rb")) as f:
                            reader = _HashingReader(f)
                            tar.addfile(_tarinfo(it.name, it.bytes, it.src.stat().st_mtime), reader)  # type: ignore[arg-type]
                        if reader.n != it.bytes or reader.h.hexdigest() != it.sha256:
                            raise UsageError(f"{it.src} does not match the sha256 its manifest records (changed or corrupt); "
                                             "nothing was written")
            raw.flush()
            os.fsync(raw.fileno())
    return PackResult(Path(out), sink.n, sink.h.hexdigest(), len(items) + 1, total, data["requirements"], data["omitted"])


# ----------------------------------------------------------------------------------------------
# reading: one pass over an archive (stream) or an unpacked folder, stopping at the first problem
# ----------------------------------------------------------------------------------------------
@dataclass
class Report:
    path: Path
    kind: str  # "archive" | "folder"
    ok: bool = False
    problem: str | None = None
    files: int = 0
    data_bytes: int = 0
    requirements: dict[str, Any] = field(default_factory=dict)
    device_checked: bool = False
    device: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    loras: dict[str, Any] = field(default_factory=dict)  # {"artifacts": [...], "engines": {component: [...]}}
    engines_folder: str | None = None  # an engine set: the card folder this machine would use (engines/rtx4090)

    def to_json(self) -> dict[str, Any]:
        return {"bundle": str(self.path), "kind": self.kind, "ok": self.ok, "problem": self.problem,
                "files": self.files, "data_bytes": self.data_bytes, "requirements": self.requirements,
                "device_checked": self.device_checked, "device": self.device, "warnings": self.warnings,
                "loras": self.loras, "engines_folder": self.engines_folder}


class _Scan:
    """Checks entries in order: bundle.json first, then each file's name, type, size and sha256;
    at the end completeness and the consistency of bundle.json with the two manifests."""

    def __init__(self, report: Report, dest: Path | None, device_check: bool, device: MachineFacts | None, log: Log) -> None:
        self.report, self.dest, self.device_check, self.device, self.log = report, dest, device_check, device, log
        self.bundle: BundleView | None = None
        self.files: dict[str, FileRecord] = {}
        self.seen: set[str] = set()
        self.blobs: dict[str, bytes] = {}

    def fail(self, msg: str) -> None:
        raise BundleProblem(msg)

    # --- bundle.json -----------------------------------------------------------------------
    def header(self, name: str, size: int, reader: IO[bytes]) -> None:
        where = self.report.path
        if name != BUNDLE_MANIFEST:
            self.fail(f"{where} is not a koala-trt bundle: its first entry is {name!r}, expected {BUNDLE_MANIFEST}")
        if size > MAX_JSON_BYTES:
            self.fail(f"{where}: {BUNDLE_MANIFEST} is {size} bytes, too large to be a bundle manifest")
        raw = reader.read(size + 1)
        view = parse_bundle(raw, f"{where}: {BUNDLE_MANIFEST}")
        for rel in view.files:
            if not safe_relpath(rel) or rel == BUNDLE_MANIFEST:
                self.fail(f"{where}: {BUNDLE_MANIFEST} lists {rel!r}, a path that escapes the bundle folder: refused")
        self.bundle, self.files = view, view.files
        self.report.requirements = view.requirements.doc
        self.report.data_bytes = sum(m.bytes for m in view.files.values())
        if self.dest is not None:
            free = shutil.disk_usage(self.dest).free
            if self.report.data_bytes > free:
                self.fail(f"unpacking needs {_gb(self.report.data_bytes)} but {self.dest.parent} has {_gb(free)} free")
            (self.dest / BUNDLE_MANIFEST).write_bytes(raw)
        self.check_device()

    def check_device(self) -> None:
        assert self.bundle is not None
        req = self.bundle.requirements
        if req.backend != "tensorrt" or not self.device_check:
            return
        facts = self.device or gather_facts()
        self.report.device = facts.to_json()
        if "engine_set" in req.doc:
            try:
                problem, folder = set_device_problem(req.doc, facts, f"{self.report.path}: {BUNDLE_MANIFEST}")
            except UsageError as e:
                self.fail(str(e))
            if problem:
                self.fail(problem)
            self.report.engines_folder = folder
            self.report.device_checked = True
            return
        try:
            problem, warnings = device_problem(req.doc, facts, f"{self.report.path}: {BUNDLE_MANIFEST}")
        except UsageError as e:
            self.fail(str(e))
        self.report.warnings += warnings
        if problem:
            self.fail(problem)
        self.report.device_checked = True

    # --- every other entry -------------------------------------------------------------------
    def entry(self, name: str, kind: str, size: int, reader: IO[bytes] | None, member: tarfile.TarInfo | None = None) -> None:
        if self.bundle is None:
            if kind != "file" or reader is None:
                self.fail(f"{self.report.path} is not a koala-trt bundle: its first entry {name!r} is not {BUNDLE_MANIFEST}")
            return self.header(name, size, reader)  # type: ignore[arg-type]
        if not safe_relpath(name.rstrip("/") if kind == "dir" else name):
            self.fail(f"entry {name!r} escapes the target folder (absolute path or `..`): refused")
        if kind == "dir":
            return None
        if kind != "file":
            self.fail(f"entry {name!r} is a {kind}: bundles hold regular files only; refused")
        meta = self.files.get(name)
        if meta is None:
            self.fail(f"unexpected entry {name!r}: it is not listed in {BUNDLE_MANIFEST}")
        if name in self.seen:
            self.fail(f"entry {name!r} appears twice")
        if size != meta.bytes:
            self.fail(f"{name} has {size} bytes, {BUNDLE_MANIFEST} says {meta.bytes} (changed or corrupt)")
        if size >= LOUD_BYTES and progress_enabled():
            self.log(f"  {name} ({_gb(size)})")
        keep = name in (MANIFEST, ENGINES_MANIFEST, SET_INDEX) or (
            name.startswith(f"{ENGINES_DIR}/") and name.endswith(f"/{ENGINES_MANIFEST_NAME}") and name.count("/") == 2)
        if keep and size > MAX_JSON_BYTES:
            self.fail(f"{name} is {size} bytes, too large to be a manifest")
        h, n, chunks = hashlib.sha256(), 0, []
        out = self._open_dest(name, member) if self.dest is not None else None
        try:
            while b := reader.read(CHUNK):  # type: ignore[union-attr]
                h.update(b)
                n += len(b)
                if keep:
                    chunks.append(b)
                if out is not None:
                    out.write(b)
        finally:
            if out is not None:
                out.close()
        if n != size:
            self.fail(f"{name} ends after {n} of {size} bytes (truncated)")
        if h.hexdigest() != meta.sha256:
            self.fail(f"{name} does not match its sha256 in {BUNDLE_MANIFEST} (changed or corrupt)")
        if keep:
            self.blobs[name] = b"".join(chunks)
        self.seen.add(name)
        self.report.files += 1
        return None

    def _open_dest(self, name: str, member: tarfile.TarInfo | None) -> IO[bytes]:
        assert self.dest is not None
        if member is not None and hasattr(tarfile, "data_filter"):
            try:  # the standard library's verdict on top of ours (PEP 706)
                tarfile.data_filter(member, str(self.dest))
            except tarfile.FilterError as e:
                self.fail(f"entry {name!r} refused by tarfile's data filter: {e}")
        target = (self.dest / name).resolve()
        if not target.is_relative_to(self.dest.resolve()):
            self.fail(f"entry {name!r} escapes the target folder: refused")
        target.parent.mkdir(parents=True, exist_ok=True)
        return open(target, "xb")

    # --- the end -----------------------------------------------------------------------------
    def finish(self) -> None:
        where = self.report.path
        if self.bundle is None:
            self.fail(f"{where} is empty: no {BUNDLE_MANIFEST}")
        missing = [n for n in self.files if n not in self.seen]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            what = "the archive is truncated or was packed partially" if self.report.kind == "archive" else "the folder is incomplete"
            self.fail(f"{missing[0]}{more} is missing: {what}")
        self.consistency()
        self.report.files += 1  # bundle.json
        self.report.ok = True

    def consistency(self) -> None:
        """bundle.json against the manifests it carries: every graph, tokenizer, scheduler file and
        engine the manifests name is in the bundle with the same sha256."""
        assert self.bundle is not None
        if MANIFEST not in self.blobs:
            self.fail(f"the bundle has no {MANIFEST} (artifacts manifest)")
        try:
            art = read_artifacts(json.loads(self.blobs[MANIFEST]), MANIFEST)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.fail(f"{MANIFEST} is corrupt ({e})")
        except UsageError as e:
            self.fail(str(e))
        omitted = set(self.bundle.omitted)
        for rel, meta in art.files.items():
            if rel in omitted:
                continue
            if rel not in self.files:
                self.fail(f"{rel} (listed in {MANIFEST}) is not in the bundle")
            if self.files[rel].sha256 != meta.sha256:
                self.fail(f"{rel}: {BUNDLE_MANIFEST} and {MANIFEST} disagree on its sha256")
        for rel in [*(f"{t}/" for t in art.tokenizers), art.scheduler]:
            if rel and not any(f == rel or (rel.endswith("/") and f.startswith(rel)) for f in self.files):
                self.fail(f"{rel} (tokenizer or scheduler config named in {MANIFEST}) is not in the bundle")
        self.report.loras = {"artifacts": [a.to_json() for a in art.loras]}
        req = self.bundle.requirements
        for comp, c in art.components.items():
            r = req.components.get(comp)
            if c.file not in self.files and (r is None or r.backend != "tensorrt"):
                self.fail(f"{comp}: its graph {c.file} is not in the bundle and no engine replaces it")
        if req.backend != "tensorrt":
            if ENGINES_MANIFEST in self.files or any(c.backend == "tensorrt" for c in req.components.values()):
                self.fail(f"{BUNDLE_MANIFEST} says backend {req.backend!r} but the bundle carries engines")
            return
        if "engine_set" in req.doc:
            return self.set_consistency(art)
        if ENGINES_MANIFEST not in self.blobs:
            self.fail(f"the bundle requires TensorRT but has no {ENGINES_MANIFEST}")
        try:
            info = EnginesRecord.from_json(json.loads(self.blobs[ENGINES_MANIFEST]), ENGINES_MANIFEST)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.fail(f"{ENGINES_MANIFEST} is corrupt ({e})")
        except UsageError as e:
            self.fail(str(e))
        try:
            agree = requirements_compat(req.doc, BUNDLE_MANIFEST).to_json() == _legacy_view(req.doc, info.compat).to_json()
        except UsageError as e:
            self.fail(str(e))
        if not agree:
            self.fail(f"{BUNDLE_MANIFEST} and {ENGINES_MANIFEST} disagree on the GPU, the targets or the library version")
        for comp, e in info.engines.items():
            name = f"{ENGINES_DIR}/{e.file}"
            if name not in self.files:
                self.fail(f"engine {name} of {comp} (listed in {ENGINES_MANIFEST}) is not in the bundle")
            if self.files[name].sha256 != e.sha256:
                self.fail(f"{name}: {BUNDLE_MANIFEST} and {ENGINES_MANIFEST} disagree on its sha256")
        self.report.loras["engines"] = {c: [a.to_json() for a in e.loras] for c, e in info.engines.items()}
        mismatch = adapter_mismatch(info.engines, {c: art.adapters(c) for c in info.engines}, f"the bundle's {ENGINES_MANIFEST}")
        if mismatch:
            self.report.warnings.append(mismatch)


    def set_consistency(self, art: Any) -> None:
        """An engine-set bundle: its index agrees with bundle.json's requirements and files, and every card's
        manifest and engines are in the bundle with the sha256 the index and the manifest record."""
        assert self.bundle is not None
        if SET_INDEX not in self.blobs:
            self.fail(f"the bundle requires an engine set but has no {SET_INDEX}")
        try:
            cards = es.parse_index(json.loads(self.blobs[SET_INDEX]), SET_INDEX)
            wanted = set_cards(self.bundle.requirements.doc, BUNDLE_MANIFEST)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.fail(f"{SET_INDEX} is corrupt ({e})")
        except KoalaError as e:
            self.fail(str(e))
        if sorted(cards) != sorted(wanted.cards) or any(
                cards[n].compat.to_json() != wanted.cards[n].compat.to_json() for n in cards):
            self.fail(f"{BUNDLE_MANIFEST} and {SET_INDEX} disagree on the cards, their targets or library versions")
        self.report.loras["engines"] = {}
        for n, card in cards.items():
            for rel, meta in card.files.items():
                name = f"{ENGINES_DIR}/{rel}"
                if name not in self.files:
                    self.fail(f"{name} of card {n} (listed in {SET_INDEX}) is not in the bundle")
                if self.files[name].sha256 != meta["sha256"]:
                    self.fail(f"{name}: {BUNDLE_MANIFEST} and {SET_INDEX} disagree on its sha256")
            where = f"{ENGINES_DIR}/{card.path}/{ENGINES_MANIFEST_NAME}"
            try:
                info = EnginesRecord.from_json(json.loads(self.blobs[where]), where)
            except (KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
                self.fail(f"{where} is missing or corrupt ({e})")
            except UsageError as e:
                self.fail(str(e))
            for comp, e in info.engines.items():
                name = f"{ENGINES_DIR}/{card.path}/{e.file}"
                if name not in self.files or self.files[name].sha256 != e.sha256:
                    self.fail(f"engine {name} of {comp} ({where}) is not in the bundle with the sha256 it records")
            self.report.loras["engines"][n] = {c: [a.to_json() for a in e.loras] for c, e in info.engines.items()}
            mismatch = adapter_mismatch(info.engines, {c: art.adapters(c) for c in info.engines}, f"the bundle's {where}")
            if mismatch:
                self.report.warnings.append(mismatch)


_KINDS = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
          tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO", tarfile.CONTTYPE: "contiguous file"}


def _member_kind(m: tarfile.TarInfo) -> str:
    if m.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return "file"
    if m.isdir():
        return "dir"
    return _KINDS.get(m.type, f"tar entry of type {m.type!r}")


def _scan_archive(path: Path, scan: _Scan) -> None:
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw  # type: ignore[assignment]
        try:
            with tarfile.open(fileobj=stream, mode="r|", bufsize=IO_BLOCK) as tar:
                for member in tar:
                    kind = _member_kind(member)
                    reader = tar.extractfile(member) if kind == "file" else None
                    scan.entry(member.name, kind, member.size, reader, member)
            # tarfile stops at the end-of-archive blocks; reading on to the end makes gzip check
            # its trailer (CRC-32 and length), which catches a cut or altered tail.
            while stream.read(CHUNK):
                pass
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise BundleProblem(f"{path} is truncated or corrupt: {e}") from None
    scan.finish()


def _folder_hint(root: Path) -> str:
    """What a folder without bundle.json is, from its manifest's format (an artifacts or an engines folder)."""
    try:
        kind = json.loads((root / MANIFEST).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        return ""
    if kind == ENGINES_FORMAT:
        return " (it is an engines folder; pack it with its artifacts: `koala-trt pack --artifacts DIR --engines DIR`)"
    if kind == ARTIFACTS_FORMAT:
        return " (it is an artifacts folder; pack it with `koala-trt pack`)"
    return ""


def _scan_folder(root: Path, scan: _Scan) -> None:
    head = root / BUNDLE_MANIFEST
    if not head.is_file():
        hint = _folder_hint(root)
        raise UsageError(f"{root} is not a bundle: no {BUNDLE_MANIFEST}{hint}")
    with open(head, "rb") as f:
        scan.entry(BUNDLE_MANIFEST, "file", head.stat().st_size, f)
    for rel in scan.files:
        p = root / rel
        if p.is_symlink() or (p.exists() and not p.resolve().is_relative_to(root.resolve())):
            scan.fail(f"{rel} is a symbolic link or lies outside {root}: bundles hold regular files only")
        if p.is_file():
            with open(p, "rb") as f:
                scan.entry(rel, "file", p.stat().st_size, f)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(filenames) + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            rel = (Path(dirpath) / n).relative_to(root).as_posix()
            if rel != BUNDLE_MANIFEST and rel not in scan.files:
                scan.fail(f"unexpected file {rel} in {root}: it is not listed in {BUNDLE_MANIFEST}")
    scan.finish()


def verify(target: Path, device_check: bool = True, device: MachineFacts | None = None, log: Log = _quiet) -> Report:
    """Check a bundle archive or an unpacked bundle folder; the report names the first problem."""
    target = Path(target)
    if not target.exists():
        raise UsageError(f"{target} does not exist")
    report = Report(target, "folder" if target.is_dir() else "archive")
    scan = _Scan(report, None, device_check, device, log)
    try:
        (_scan_folder if target.is_dir() else _scan_archive)(target, scan)
    except BundleProblem as e:
        report.problem = str(e)
    return report


def unpack(bundle: Path, out: Path, force: bool = False, log: Log = _quiet) -> Report:
    """Extract a bundle archive into OUT, checking every entry as it is written; OUT appears only
    when the whole archive checked out (no device check: unpack anywhere, verify on the target)."""
    bundle = Path(bundle)
    if not bundle.is_file():
        raise UsageError(f"{bundle} is not a file" if bundle.exists() else f"{bundle} does not exist")
    report = Report(bundle, "archive")
    with staged_dir(Path(out), force) as stage:
        _scan_archive(bundle, _Scan(report, stage, False, None, log))
    return report

