"""Shared pieces of the table-driven bad-input tests (tests/test_bad_inputs_<family>.py).

A case is (id, argv, exit code, stderr): argv and the expected stderr name their inputs by placeholders
({T} the test's folder, {ART} the session's random:tiny artifacts, {CAL} its calibration set, and the
bad inputs below), built on demand in the test's folder. The expected stderr is the whole of it: one
`Error: ...` line, nothing printed before it (the check ran before any work) and no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _regular_file(t: Path, fx: dict[str, Path]) -> Path:
    """A regular file: as --out it is "exists"; FILE/x is unwritable even for root (chmod is not)."""
    p = t / "file"
    p.write_text("not a folder\n")
    return p


def _folder(p: Path) -> Path:
    p.mkdir()
    return p


def _with_manifest(dst: Path, text: str) -> Path:
    dst.mkdir()
    (dst / "manifest.json").write_text(text)
    return dst


def _truncated_graph(t: Path, fx: dict[str, Path]) -> Path:
    """An artifacts folder whose U-Net graph was cut short (a copy interrupted half-way)."""
    d = _copy(fx["ART"], t / "trunc")
    g = d / "unet" / "model.onnx"
    g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    return d


def _missing_graph(t: Path, fx: dict[str, Path]) -> Path:
    d = _copy(fx["ART"], t / "nograph")
    (d / "unet" / "model.onnx").unlink()
    return d


def _half_manifest(t: Path, fx: dict[str, Path]) -> Path:
    """An artifacts folder whose manifest.json was cut off mid-write (not written atomically)."""
    d = _copy(fx["ART"], t / "halfmanifest")
    m = d / "manifest.json"
    m.write_text(m.read_text()[:200])
    return d


def _foreign_calibration(t: Path, fx: dict[str, Path]) -> Path:
    """LABELLED TEST DATA: the session's calibration set relabelled as recorded with another U-Net (the
    config hash `koala-trt calibrate` records); the shards stay random:tiny's."""
    d = _copy(fx["CAL"], t / "foreigncal")
    m = json.loads((d / "manifest.json").read_text())
    m["settings"]["model"] = "random:tiny-sdxl"
    m["settings"]["config_sha256"]["unet"] = "f" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def _incomplete_calibration(t: Path, fx: dict[str, Path]) -> Path:
    """A calibration set interrupted after its first prompt (the manifest lists 2 prompts, 1 shard)."""
    d = _copy(fx["CAL"], t / "halfcal")
    m = json.loads((d / "manifest.json").read_text())
    for s in m["shards"][1:]:
        (d / s["file"]).unlink()
    m["shards"] = m["shards"][:1]
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def _engines(t: Path, fx: dict[str, Path], name: str = "eng", **kw: object) -> Path:
    from engines_helpers import fake_engines_dir

    return fake_engines_dir(fx["ART"], t / name, **kw)


def _engines_without_spec(t: Path, fx: dict[str, Path]) -> Path:
    d = _engines(t, fx, "engnospec")
    m = json.loads((d / "manifest.json").read_text())
    del m["engines"]["unet"]["spec"]
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def engines_with_plans(t: Path, art: Path, name: str, **kw: object) -> Path:
    """fake_engines_dir with a plan file per engine and the manifest's sha256/bytes of those files.
    LABELLED TEST DATA: the plans are placeholder bytes (no TensorRT here); they serve readers that
    check presence, size, hashes and the device record (pack, verify, triton), never a runtime."""
    import hashlib

    from engines_helpers import fake_engines_dir

    d = fake_engines_dir(art, t / name, **kw)
    m = json.loads((d / "manifest.json").read_text())
    for comp, e in m["engines"].items():
        data = f"placeholder plan of {comp}, not a TensorRT engine\n".encode() * 64
        (d / e["file"]).write_bytes(data)
        e["sha256"], e["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def _engines_cut_plan(t: Path, fx: dict[str, Path]) -> Path:
    """An engines folder whose U-Net plan was cut short after the manifest was written."""
    d = engines_with_plans(t, fx["ART"], "engcutplan")
    m = json.loads((d / "manifest.json").read_text())
    plan = d / m["engines"]["unet"]["file"]
    plan.write_bytes(plan.read_bytes()[:100])
    return d


def _bundle_json(d: Path, text: str) -> Path:
    d.mkdir()
    (d / "bundle.json").write_text(text)
    return d


BUILDERS: dict[str, Callable[[Path, dict[str, Path]], Path]] = {
    "FILE": _regular_file,
    "DIR": lambda t, fx: _folder(t / "dir"),
    "EMPTY": lambda t, fx: _folder(t / "empty"),
    "BADJSON": lambda t, fx: _with_manifest(t / "badjson", "{not json"),
    "NOKEYS": lambda t, fx: _with_manifest(t / "nokeys", "{}"),
    "HALFMANIFEST": _half_manifest,
    "TRUNC": _truncated_graph,
    "NOGRAPH": _missing_graph,
    "FOREIGNCAL": _foreign_calibration,
    "HALFCAL": _incomplete_calibration,
    "ENG": _engines,
    "ENGNOSPEC": _engines_without_spec,
    "ENGBADJSON": lambda t, fx: _with_manifest(t / "engbadjson", "[1, 2"),
    "ENGPLANS": lambda t, fx: engines_with_plans(t, fx["ART"], "engplans"),
    "ENGCUTPLAN": _engines_cut_plan,
    "BUNDLEBADJSON": lambda t, fx: _bundle_json(t / "bundlebadjson", "{\"format\": "),
    "BUNDLENOKEYS": lambda t, fx: _bundle_json(t / "bundlenokeys", "{}"),
}


def expand(items: list[str], t: Path, fx: dict[str, Path]) -> list[str]:
    """Fill placeholders, building each bad input the first time a case names it."""
    out = []
    for s in items:
        for key, build in BUILDERS.items():
            if "{" + key + "}" in s and key not in fx:
                fx[key] = build(t, fx)
        out.append(s.format(T=t, **fx, **_graph_sizes(fx)))
    return out


def _graph_sizes(fx: dict[str, Path]) -> dict[str, int]:
    """The U-Net graph's bytes in the artifacts under test, and what _truncated_graph leaves of it
    (read from the file: an export's size is not a constant to write into a test)."""
    if "ART" not in fx:
        return {}
    full = (fx["ART"] / "unet" / "model.onnx").stat().st_size
    return {"UNET_BYTES": full, "UNET_HALF": full // 2}


def check_case(argv: list[str], code: int, stderr: str, t: Path, fx: dict[str, Path]) -> None:
    args = expand(argv, t, fx)
    want = expand([stderr], t, fx)[0]
    got_code, out, err = run_cli(*args)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if lines[:1] and lines[0].startswith("Usage: koala-trt ") and lines[1:2] and lines[1].startswith("Try "):
        lines = lines[2:]  # Click's usage hint above its option errors
    if want.startswith("...\n"):  # progress lines whose text varies (timings) may come first
        lines, want = lines[-1:], want[4:]
    assert lines == want.splitlines(), f"{' '.join(args)}\n got: {err.strip()}\nwant: {want}"
    assert got_code == code, f"{' '.join(args)}: exit {got_code}, want {code}"


def run_and_terminate(argv: list[str], out: Path, ready: Callable[[], bool], timeout: float = 120.0) -> tuple[int, str]:
    """Run `koala-trt ARGV` in a subprocess, SIGTERM it once `ready()` holds (it is writing), and return
    (exit code, stderr). Fails if the command ends before it was caught mid-way."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "koala_trt.cli", *argv], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert p.poll() is None, f"finished (exit {p.returncode}) before it could be interrupted: {p.stderr.read()}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "never reached the point to interrupt"
            time.sleep(0.02)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err


def staging_leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))
