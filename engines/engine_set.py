"""Engine sets: the engines of several cards in one folder, chosen at run time.

    ENGINES/engines-index.json     the index (below)
    ENGINES/<card>/manifest.json   an ordinary engines folder per card (`koala-trt build --profile <card>`)
    ENGINES/<card>/*.plan

`koala-trt build --profile rtx2080ti,rtx3060ti,rtx4090 --out ENGINES` (or `--profile all-rtx`) builds
each card into ENGINES/<card>/ and writes the index; `generate/validate/bench/serve --engines ENGINES`
take the card folder that runs on this machine's GPU (`resolve_engines`), decided by the one
compatibility rule (engines.compat.card_verdict: compute capability, library version, memory).

The index (format koala-trt/engine-set, version 1): per card the folder, the profile's GPU (names,
compute capability, memory), the engines' library and targets (engines_record.Compat), the sha256 and
size of the card's manifest.json and of every engine, the key of what it was built from (`inputs_key`:
the sha256 of its ONNX inputs, build flags, profile and library version; an unchanged card is not
built again), the memory aids it was built with (the planner's `--auto` choice included) and what
the build measured (seconds, peak RSS of its process). Nothing here imports TensorRT.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engines.compat import MachineFacts, Verdict, card_verdict, gather_facts, sm
from engines.cuda import DeviceInfo
from engines.engines_record import Compat, EnginesRecord, safe_relpath
from engines.libraries import LIBRARIES
from engines.profile import GIB, GpuProfile, builtin_names, load_profile
from exporter.manifest import sha256_file
from koala_core import __version__
from koala_core.errors import KoalaError, UsageError

INDEX = "engines-index.json"
FORMAT = "koala-trt/engine-set"
FORMAT_VERSION = 1
ALL_RTX = "all-rtx"
CARD_MANIFEST = "manifest.json"


class CorruptSet(KoalaError):
    """The index does not match the files it lists (exit 1)."""


# ----- which cards -------------------------------------------------------------------------------
def is_set(profile_ref: str) -> bool:
    """Does `--profile` name a set (several cards, or all-rtx) rather than one card?"""
    return "," in profile_ref or profile_ref.strip() == ALL_RTX


def all_rtx() -> list[str]:
    """The GeForce cards: built-in profiles that build with TensorRT-RTX for one named card (not
    rtx-portable, which names none), oldest compute capability first."""
    cards = [p for p in (load_profile(n) for n in builtin_names()) if p.build.library == "tensorrt-rtx" and p.gpu.names]
    return [p.name for p in sorted(cards, key=lambda p: tuple(int(x) for x in p.gpu.compute_capability.split(".")))]


def parse_cards(profile_ref: str, library: str | None = None) -> list[GpuProfile]:
    """The profiles of `--profile a,b,c` (or all-rtx), each checked: known, listed once, and built by a
    library that can target it from this machine (TensorRT-RTX; --library applies to every card)."""
    names = [n.strip() for n in profile_ref.split(",")]
    names = [c for n in names for c in (all_rtx() if n == ALL_RTX else [n])]
    known = ", ".join([*builtin_names(), ALL_RTX])
    seen: dict[str, str] = {}
    profiles = []
    for n in names:
        if not n:
            raise UsageError(f"--profile {profile_ref} has an empty card name; known cards: {known}")
        try:
            p = load_profile(n)
        except UsageError as e:
            if n.endswith(".toml") or "/" in n:
                raise
            raise UsageError(f"unknown card {n!r} in --profile {profile_ref}; known cards: {known} (or the path of a "
                             "profile .toml)") from e
        if p.name in seen:
            raise UsageError(f"card {p.name} is listed twice in --profile {profile_ref}"
                             + (f" ({seen[p.name]} and {n})" if seen[p.name] != n else ""))
        seen[p.name] = n
        if library:
            p = p.with_library(library)  # refuses a card the library cannot target (h100-80gb with tensorrt-rtx)
        lib = LIBRARIES[p.build.library]
        if not lib.builds_without_gpu:
            rtx = LIBRARIES["tensorrt-rtx"]
            why = (f"pass --library tensorrt-rtx (it can target {sm(p.gpu.compute_capability)})"
                   if rtx.can_target(p.gpu.compute_capability) else
                   f"TensorRT-RTX cannot target {p.name}'s {sm(p.gpu.compute_capability)}; build it on the card on its own "
                   f"(koala-trt build --profile {n})")
            raise UsageError(f"card {p.name} builds with {p.build.library} on the card itself; a set of several cards is "
                             f"built here with TensorRT-RTX: {why}")
        profiles.append(p)
    return profiles


# ----- what a card was built from ----------------------------------------------------------------
def _key(library: str, version: str | None, flags: Any, profile: Any, components: dict[str, Any]) -> str:
    doc = {"library": library, "version": version, "flags": flags, "profile": profile, "components": components}
    canon = json.dumps(json.loads(json.dumps(doc)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def plan_key(plan: Any) -> str:
    """The inputs key of a build plan (engines.buildplan.BuildPlan): what its manifest will record."""
    comps = {n: {"precision": c.precision, "inputs": {k: [list(a), list(b), list(x)] for k, (a, b, x) in c.profile_shapes.items()},
                 "onnx": {rel: f.sha256 for rel, f in c.onnx_files.items()}} for n, c in plan.components.items()}
    return _key(plan.library.name, plan.trt_version, plan.flags, plan.profile.to_json(), comps)


def manifest_key(data: dict[str, Any]) -> str:
    """The inputs key of a built card, from its manifest.json: the sha256 of its ONNX inputs, build flags,
    profile and library version (what `plan_key` gives for the same build)."""
    comps = {n: {"precision": e.get("precision"),
                 "inputs": {k: [v["min"], v["opt"], v["max"]] for k, v in e.get("inputs", {}).items()},
                 "onnx": {rel: f.get("sha256") for rel, f in (e.get("source") or {}).get("files", {}).items()}}
             for n, e in data.get("engines", {}).items()}
    lib = data.get("library") or {}
    return _key(lib.get("name"), lib.get("version"), data.get("flags"), data.get("profile"), comps)


# ----- the index ---------------------------------------------------------------------------------
@dataclass
class Card:
    """One card of a set, as the index records it."""

    name: str
    path: str  # folder, relative to the set
    compat: Compat
    gpu: dict[str, Any]  # the profile's [gpu]: names, compute_capability, memory_gib, reserved_gib
    files: dict[str, dict[str, Any]]  # path relative to the set -> {sha256, bytes}; the manifest first
    inputs_sha256: str
    data: dict[str, Any] = field(default_factory=dict, repr=False)  # the entry as written

    @property
    def usable_bytes(self) -> int:
        return int((float(self.gpu["memory_gib"]) - float(self.gpu.get("reserved_gib", 0))) * GIB)

    def describe(self) -> str:
        """rtx3060ti (sm_86, TensorRT-RTX 1.7.1.116)"""
        t = ", ".join(sm(c) for c in self.compat.targets.compute_capabilities)
        return f"{self.name} ({t}, {self.compat.library.label} {self.compat.library.version})"


def card_entry(root: Path, card: str, build: dict[str, Any] | None = None) -> dict[str, Any]:
    """The index entry of ROOT/<card> from its manifest (engine sha256 as the manifest records them, the
    manifest's own sha256 computed here)."""
    folder = Path(root) / card
    raw = (folder / CARD_MANIFEST).read_bytes()
    data = json.loads(raw)
    rec = EnginesRecord.from_json(data, str(folder / CARD_MANIFEST))
    prof = data.get("profile") or {}
    files = {f"{card}/{CARD_MANIFEST}": {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}}
    for e in rec.engines.values():
        files[f"{card}/{e.file}"] = {"sha256": e.sha256, "bytes": e.bytes}
    g = prof.get("gpu") or {}
    return {
        "path": card,
        "profile": prof.get("name", card),
        "gpu": {"names": list(g.get("names", [])), "compute_capability": g.get("compute_capability"),
                "memory_gib": g.get("memory_gib"), "reserved_gib": g.get("reserved_gib", 0)},
        **rec.compat.to_json(),
        "engines": {c: {"file": e["file"], "precision": e.get("precision"), "bytes": e["bytes"],
                        "build_seconds": e.get("build_seconds")} for c, e in data["engines"].items()},
        "aids": {"vae_tile": (prof.get("vae") or {}).get("tile"),
                 "residency": (prof.get("runtime") or {}).get("residency", "resident"),
                 "weight_streaming": bool((prof.get("build") or {}).get("weight_streaming", False)),
                 "auto": bool((data.get("build") or {}).get("args", {}).get("auto")) or bool((build or {}).get("auto"))},
        "memory": _memory_verdict(data),
        "inputs_sha256": manifest_key(data),
        "files": files,
        "build": {k: v for k, v in (build or {}).items() if k != "auto"},
    }


def _memory_verdict(data: dict[str, Any]) -> dict[str, Any] | None:
    est = (data.get("build") or {}).get("memory_estimate")
    if not isinstance(est, dict):
        return None
    v = est.get("verdict") or {}
    return {k: v.get(k) for k in ("mode", "peak_bytes", "usable_bytes", "fits", "complete")} if v else None


def index_data(cards: dict[str, dict[str, Any]], summary: list[dict[str, Any]]) -> dict[str, Any]:
    from datetime import datetime, timezone

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "koala-trt": __version__,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "cards": cards, "summary": summary}


def write_index(root: Path, cards: dict[str, dict[str, Any]], summary: list[dict[str, Any]]) -> Path:
    """ROOT/engines-index.json, written under a temporary name and renamed (nothing half-written)."""
    from koala_core.jsonfile import write_json

    write_json(Path(root) / INDEX, index_data(cards, summary))
    return Path(root) / INDEX


@dataclass
class EngineSet:
    root: Path
    cards: dict[str, Card]
    data: dict[str, Any]

    def names(self) -> list[str]:
        return list(self.cards)


def is_engine_set(root: Path | str) -> bool:
    return (Path(root) / INDEX).is_file()


def parse_index(data: Any, where: str) -> dict[str, Card]:
    """The cards of an index document; a garbled one is CorruptSet naming `where` and the key."""
    def bad(what: str) -> CorruptSet:
        return CorruptSet(f"{where} is corrupt: {what}; rebuild the set with `koala-trt build --profile CARDS --out DIR --force`")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise bad(f"format {got!r}, expected {FORMAT!r}")
    version = data.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UsageError(f"{where} was written by a newer koala-trt (format version {version}); upgrade koala-trt")
    if version != FORMAT_VERSION:
        raise bad(f"format_version {version!r}")
    cards = data.get("cards")
    if not isinstance(cards, dict) or not cards:
        raise bad("it lists no cards")
    out = {}
    for name, e in cards.items():
        try:
            compat = Compat.from_json(e, f"{where} cards.{name}")
            files = e["files"]
            path = e["path"]
            gpu = e["gpu"]
            ok = (isinstance(files, dict) and files and safe_relpath(path) and "/" not in path and isinstance(gpu, dict)
                  and all(safe_relpath(f) and f.startswith(path + "/") and isinstance(m, dict) and isinstance(m.get("sha256"), str)
                          and isinstance(m.get("bytes"), int) for f, m in files.items())
                  and isinstance(gpu.get("memory_gib"), (int, float)))
        except (UsageError, KeyError, TypeError) as err:
            raise bad(f"cards.{name}: {err}") from None
        if not ok:
            raise bad(f"cards.{name} has no valid path, gpu or files")
        out[name] = Card(name, path, compat, gpu, files, str(e.get("inputs_sha256", "")), e)
    return out


def load_set(root: Path | str) -> EngineSet:
    """ROOT/engines-index.json, read and checked for form (the files are checked by `check_card`)."""
    root = Path(root)
    where = root / INDEX
    try:
        data = json.loads(where.read_bytes())
    except (OSError, ValueError) as e:
        raise CorruptSet(f"{where} is corrupt ({e}); rebuild the set with `koala-trt build --profile CARDS --out "
                         f"{root} --force`") from None
    return EngineSet(root, parse_index(data, str(where)), data)


def card_problem(root: Path, card: Card, full: bool = False) -> str | None:
    """Why ROOT/<card> does not match the index (a file missing, another size, or, with full=True or for
    the card's manifest, another sha256), or None."""
    for i, (rel, meta) in enumerate(card.files.items()):
        p = Path(root) / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{rel} has {p.stat().st_size} bytes, the index says {meta['bytes']}"
        if (full or i == 0) and sha256_file(p) != meta["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def check_card(root: Path, card: Card, full: bool = False) -> None:
    """CorruptSet (exit 1) when ROOT/<card> does not match the index."""
    problem = card_problem(root, card, full)
    if problem:
        raise CorruptSet(f"{Path(root) / INDEX} does not match its files: {problem} (changed or corrupt); rebuild the "
                         f"card with `koala-trt build --profile {card.name} ... --out {root}` or the set with --force")


# ----- the run-time choice -----------------------------------------------------------------------
def _here(facts: MachineFacts, libraries: set[str]) -> str:
    libs = ", ".join(f"{'TensorRT-RTX' if n == 'tensorrt-rtx' else 'TensorRT'} {facts.library_version(n) or 'not installed'}"
                     for n in sorted(libraries))
    if not facts.gpus:
        return f"no usable GPU ({facts.why_no_gpu or 'no NVIDIA GPU was found'}), {libs}"
    g = facts.gpus[0]
    return f"{g.name} ({sm(g.compute_capability)}, {g.memory_bytes / GIB:.1f} GiB), {libs}"


def first_gpu(facts: MachineFacts) -> MachineFacts:
    """The facts of the GPU the runtime opens (the first CUDA device)."""
    if len(facts.gpus) <= 1:
        return facts
    return MachineFacts(facts.gpus[:1], facts.tensorrt, facts.tensorrt_rtx, facts.why_no_gpu, facts.source)


def choose_card(engine_set: EngineSet, facts: MachineFacts) -> tuple[Card | None, dict[str, Verdict]]:
    """The card of the set whose engines run on this machine's GPU (engines.compat.card_verdict decides
    which may), and every card's verdict. Among those that may: the one whose profile names this GPU,
    then the one planned for the most memory, then the one built for the fewest targets (a native engine
    before a portable one), then the index's order."""
    facts = first_gpu(facts)
    verdicts = {n: card_verdict(c.compat, c.usable_bytes, facts) for n, c in engine_set.cards.items()}
    fit = [c for n, c in engine_set.cards.items() if verdicts[n].ok]
    if not fit:
        return None, verdicts
    gpu = facts.gpus[0]
    order = list(engine_set.cards)
    best = min(fit, key=lambda c: (gpu.name not in c.gpu.get("names", []), -c.usable_bytes,
                                   len(c.compat.targets.compute_capabilities), order.index(c.name)))
    return best, verdicts


def none_fits(engine_set: EngineSet, facts: MachineFacts, verdicts: dict[str, Verdict], label: str | None = None) -> str:
    """One line: what the set has, what this machine is, and why the cards built for this GPU's compute
    capability (if any) do not run here."""
    libs = {c.compat.library.name for c in engine_set.cards.values()}
    have = ", ".join(c.describe() for c in engine_set.cards.values())
    line = (f"no card of {label or f'the engine set {engine_set.root}'} runs here: this machine has "
            f"{_here(first_gpu(facts), libs)}; the set has {have}")
    reasons: dict[str, list[str]] = {}
    for name, v in verdicts.items():
        if facts.gpus and not v.wrong_gpu:  # built for this compute capability, refused for another reason
            for p in v.problems:
                reasons.setdefault(p, []).append(name)
    if reasons:
        line += " (" + "; ".join(f"{', '.join(cards)}: {p}" for p, cards in reasons.items()) + ")"
    return line


def resolve_engines(engines: Path | str, facts: MachineFacts | None = None,
                    log: Callable[[str], None] | None = None) -> Path:
    """--engines as given, or, for an engine set, the folder of the card that runs here (one line says
    which, through `log`); none fits: one UsageError line; an index that does not match its files:
    CorruptSet. An ordinary engines folder is returned as it is (its own check runs when it loads)."""
    root = Path(engines)
    if not is_engine_set(root):
        return root
    es = load_set(root)
    facts = facts if facts is not None else gather_facts()
    card, verdicts = choose_card(es, facts)
    if card is None:
        raise UsageError(none_fits(es, facts, verdicts))
    check_card(root, card)
    g = first_gpu(facts).gpus[0]
    if log is not None:
        log(f"using {root / card.path} (card {card.name}: {', '.join(sm(c) for c in card.compat.targets.compute_capabilities)}, "
            f"{card.compat.library.label} {card.compat.library.version}; this GPU: {g.name}, {sm(g.compute_capability)}, "
            f"{g.memory_bytes / GIB:.1f} GiB)")
    return root / card.path


def describe_device(d: DeviceInfo) -> str:
    return f"{d.name} ({sm(d.compute_capability)}, {d.memory_bytes / GIB:.1f} GiB)"
