"""`koala-trt build --profile a,b,c` (or all-rtx): an engine set (engines/engine_set.py). Every card is
planned here first (so a bad option or a missing precision fails before anything is built), then each
card that is not already built from the same inputs is built by `koala-trt build --profile <card>` in a
process of its own (one card's failure or memory does not take the others down; its peak RSS is its
process's), at most --jobs at a time; then the index is written."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from koala_core.errors import KoalaError, UsageError

CHILD = "import sys; from koala_trt.cli import main; sys.exit(main(sys.argv[1:]))"


@dataclass
class CardJob:
    name: str
    ref: str  # the child's --profile: a built-in name, or the .toml file's path
    plan: Any  # engines.buildplan.BuildPlan
    key: str
    action: str = "build"  # build | skip
    why: str = ""
    seconds: float = 0.0
    peak_rss_bytes: int | None = None
    returncode: int | None = None
    tail: list[str] = field(default_factory=list)


def child_args(ref: str, out: Path, options: dict[str, Any]) -> list[str]:
    """The single-card `koala-trt build` command line of one card of the set."""
    args = ["build", "--profile", ref, "--out", str(out), "--force"]
    for d in options["onnx"]:
        args += ["--onnx", str(d)]
    if options.get("components"):
        args += ["--components", ",".join(options["components"])]
    for key in ("library", "precision", "batch", "height", "width", "vae_tile", "residency", "weight_streaming_budget"):
        if options.get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(options[key])]
    for flag in ("weight_streaming", "auto", "no_estimate", "verbose"):
        if options.get(flag):
            args.append(f"--{flag.replace('_', '-')}")
    return args


def _run_child(job: CardJob, args: list[str], log: Callable[[str], None]) -> None:
    """Run one card's build, its output prefixed with the card's name; its peak RSS from wait4."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        job.tail = (job.tail + [line])[-20:]
        log(f"[{job.name}] {line}")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    job.returncode = proc.returncode
    job.peak_rss_bytes = int(usage.ru_maxrss) * 1024  # KiB on Linux
    job.seconds = time.perf_counter() - t0


def build_set(profile_ref: str, onnx_dirs: tuple[Path, ...], out: Path, options: dict[str, Any], jobs: int,
              dry_run: bool, force: bool, as_json: bool, log: Callable[[str], None]) -> None:
    from engines import engine_set as es
    from engines.buildplan import auto_plan, make_build_plan
    from engines.build import check_requirements
    from engines.libraries import LIBRARIES
    from koala_trt.commands.aid_options import apply_aids
    from koala_trt.commands.build import print_plan
    from koala_trt.commands.common import print_json, table
    from exporter.specs import parse_components

    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1 (got {jobs})")
    profiles = es.parse_cards(profile_ref, options.get("library"))
    out = Path(out)
    old: dict[str, Any] = {}
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--out {out} is a file; give a folder name")
        if es.is_engine_set(out):
            try:
                old = es.load_set(out).cards
            except KoalaError:  # a corrupt index: refused, unless --force rebuilds every card listed
                if not force:
                    raise
        elif (out / "manifest.json").is_file():
            raise UsageError(f"{out} is the engines folder of one card (manifest.json), not an engine set; choose another "
                             "--out (or remove it)")
        elif any(out.iterdir()):
            raise UsageError(f"{out} exists and is not an engine set (no {es.INDEX}); choose another --out")
    from koala_core.atomic import check_writable_parent

    check_writable_parent(out / es.INDEX)
    # plan every card before building any
    plans: list[CardJob] = []
    for p in profiles:
        p = p.with_overrides(options.get("batch"), options.get("height"), options.get("width"), options.get("precision"))
        p = apply_aids(p, options.get("vae_tile"), options.get("residency"), bool(options.get("weight_streaming")),
                       options.get("weight_streaming_budget"))
        comps = (parse_components(tuple(options["components"]), default=tuple(p.components()))
                 if options.get("components") else None)
        version = LIBRARIES[p.build.library].installed_version()
        card_out = out / p.name
        if options.get("auto"):
            plan, choice = auto_plan(list(onnx_dirs), p, card_out, comps, version, {})
            log(f"[{p.name}] --auto: {choice.summary()}")
        else:
            plan = make_build_plan(list(onnx_dirs), p, card_out, comps, version, estimate=not options.get("no_estimate")
                                   and dry_run)
        job = CardJob(p.name, p.name if p.source == "builtin" else p.source, plan, es.plan_key(plan))
        prev = old.get(p.name)
        if force:
            job.why = "--force"
        elif prev is None:
            job.why = "new"
        else:
            problem = es.card_problem(out, prev, full=True)
            if problem:
                job.why = f"its files do not match the index ({problem})"
            elif prev.inputs_sha256 != job.key or es.manifest_key(_manifest(out / prev.path)) != job.key:
                job.why = "its ONNX inputs, flags, profile or library changed"
            else:
                job.action, job.why = "skip", "unchanged (same ONNX inputs, flags, profile and library)"
        plans.append(job)
    if dry_run:
        for job in plans:
            if as_json:
                continue
            print_plan(job.plan, dry_run=True)
            click.echo(f"{job.name}: {'build' if job.action == 'build' else 'skip'} ({job.why})")
        if as_json:
            print_json({"dry_run": True, "engine_set": str(out),
                        "cards": {j.name: {"action": j.action, "why": j.why, "inputs_sha256": j.key, **j.plan.to_json()}
                                  for j in plans}})
        return
    for lib in {LIBRARIES[j.plan.profile.build.library].name for j in plans}:
        check_requirements(LIBRARIES[lib])
    out.mkdir(parents=True, exist_ok=True)
    todo = [j for j in plans if j.action == "build"]
    for j in plans:
        log(f"[{j.name}] {'building' if j.action == 'build' else 'skipped'}: {j.why}")
    _run_all(todo, out, options, jobs, log)
    # the index: every card built or skipped now, and the cards of the old index not asked for this time
    entries: dict[str, Any] = {}
    failed = [j for j in todo if j.returncode != 0]
    for j in plans:
        if j in failed:
            if j.name in old and not es.card_problem(out, old[j.name]):
                entries[j.name] = old[j.name].data  # its old folder is intact (the failed build was staged)
            continue
        if j.action == "skip":
            entries[j.name] = {**old[j.name].data, "build": {**old[j.name].data.get("build", {}), "skipped": True}}
        else:
            entries[j.name] = es.card_entry(out, j.name, {"seconds": round(j.seconds, 1),
                                                          "peak_rss_bytes": j.peak_rss_bytes, "skipped": False,
                                                          "auto": bool(options.get("auto"))})
    for name, card in old.items():
        if name not in entries and name not in {j.name for j in plans}:
            entries[name] = card.data
            log(f"[{name}] kept: in the set already, not asked for this time")
    summary = _summary(entries)
    if entries:
        es.write_index(out, entries, summary)
    if as_json:
        print_json({"dry_run": False, "engine_set": str(out), "index": str(out / es.INDEX), "cards": entries,
                    "failed": {j.name: j.tail[-1:] for j in failed}})
    else:
        click.echo(table([[r["card"], r["component"], r["precision"], f"{r['mib']:,.1f}",
                           "skipped" if r["skipped"] else f"{r['build_s']:.1f}",
                           "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:,.0f}"] for r in summary],
                         ["card", "component", "precision", "MiB", "build s", "peak RSS MiB"]))
        click.echo(f"engine set: {out} ({len(entries)} card(s): {', '.join(entries)}; index {out / es.INDEX})")
    if failed:
        raise KoalaError("; ".join(f"card {j.name} failed (exit {j.returncode}): {(j.tail or ['no output'])[-1]}"
                                   for j in failed) + (f"; the other cards were built and indexed in {out / es.INDEX}"
                                                       if entries else ""))


def _manifest(folder: Path) -> dict[str, Any]:
    import json

    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def _run_all(todo: list[CardJob], out: Path, options: dict[str, Any], jobs: int, log: Callable[[str], None]) -> None:
    """Each card's build in its own process, at most `jobs` at once."""
    pending = list(todo)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                job = pending.pop(0)
            _run_child(job, child_args(job.ref, out / job.name, options), log)
            log(f"[{job.name}] {'built' if job.returncode == 0 else f'FAILED (exit {job.returncode})'} in "
                f"{job.seconds:.1f} s, peak RSS {(job.peak_rss_bytes or 0) / 2**20:,.0f} MiB")

    threads = [threading.Thread(target=worker) for _ in range(min(jobs, len(todo)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _summary(entries: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary table's rows: card, component, precision, MiB, build s, peak RSS (of the card's process)."""
    rows = []
    for card, e in entries.items():
        b = e.get("build") or {}
        rss = b.get("peak_rss_bytes")
        for comp, x in e["engines"].items():
            rows.append({"card": card, "component": comp, "precision": x["precision"], "mib": x["bytes"] / 2**20,
                         "build_s": x.get("build_seconds") or 0.0, "skipped": bool(b.get("skipped")),
                         "peak_rss_mib": None if rss is None else rss / 2**20})
    return rows
