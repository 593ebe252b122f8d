"""Engine sets (engines/engine_set.py): `koala-trt build --profile rtx2080ti,rtx3060ti,rtx4090` builds a real
TensorRT-RTX engine set of random:tiny on this CPU (the session's tiny_rtx_set), with its index, the skip of
an unchanged card, the run-time choice of a card and the bundles that carry a set.

The machine facts of the run-time choice are given at the fact-gathering boundary only: a MachineFacts
(the GPU as cuda.py's DeviceInfo, the library version as its probe would report it), or the gatherer
engines.compat.gpus_from_cuda / the version probe engines.compat.installed_version patched for the CLI.
The compatibility rule itself (engines.compat.card_verdict / engine_verdict) always runs. The expected
choices are written out by hand from the cards' compute capabilities and memory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from importlib import metadata
from pathlib import Path

import pytest

from engines.compat import MachineFacts
from engines.cuda import DeviceInfo
from tests.conftest import RTX_SET_ARGS, RTX_SET_CARDS, run_cli

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("tensorrt_rtx") is None,
    reason="TensorRT-RTX is not installed (make install installs it)")

RTX_VERSION = metadata.version("tensorrt-rtx-cu12")  # read here, independently of the code
GIB = 1 << 30
RTX2080TI = DeviceInfo("NVIDIA GeForce RTX 2080 Ti", "7.5", int(10.75 * GIB))
RTX3060TI = DeviceInfo("NVIDIA GeForce RTX 3060 Ti", "8.6", int(7.79 * GIB))
RTX4090 = DeviceInfo("NVIDIA GeForce RTX 4090", "8.9", int(23.99 * GIB))
RTX4060 = DeviceInfo("NVIDIA GeForce RTX 4060", "8.9", int(7.6 * GIB))  # sm_89 but 8 GB: rtx4090's set is planned for 24
A10 = DeviceInfo("NVIDIA A10", "8.6", 24 * GIB)
RTX5090 = DeviceInfo("NVIDIA GeForce RTX 5090", "12.0", int(31.4 * GIB))
H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", 80 * GIB)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def sha256_of(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def last_error(err: str) -> str:
    assert "Traceback" not in err, err[-2000:]
    return err.strip().splitlines()[-1]


def index(root: Path) -> dict:
    return json.loads((root / "engines-index.json").read_text())


def build_args(fp32: Path, fp16: Path, out: Path, cards: str = ",".join(RTX_SET_CARDS)) -> tuple:
    return ("build", "--profile", cards, "--onnx", fp32, "--onnx", fp16, *RTX_SET_ARGS, "--out", out)


# ----- the set and its index ------------------------------------------------------------------------
def test_the_index_lists_every_card(tiny_rtx_set: Path) -> None:
    d = index(tiny_rtx_set)
    assert d["format"] == "koala-trt/engine-set" and d["format_version"] == 1
    assert list(d["cards"]) == list(RTX_SET_CARDS)
    expect = {"rtx2080ti": ("7.5", "fp16"), "rtx3060ti": ("8.6", "fp32"), "rtx4090": ("8.9", "fp32")}
    for card, e in d["cards"].items():
        cc, vae = expect[card]
        m = json.loads((tiny_rtx_set / card / "manifest.json").read_text())
        assert e["path"] == card and e["gpu"]["compute_capability"] == cc
        assert e["library"] == {"name": "tensorrt-rtx", "version": RTX_VERSION} == m["library"]
        assert e["targets"]["compute_capabilities"] == [cc] and e["built_on"] is None
        assert {c: x["precision"] for c, x in e["engines"].items()} == {
            "text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": vae}
        # every file of the card, its sha256 as computed here
        files = [p for p in (tiny_rtx_set / card).iterdir() if p.suffix in (".plan", ".json")]
        assert sorted(e["files"]) == sorted(f"{card}/{p.name}" for p in files)
        for rel, meta in e["files"].items():
            assert meta == {"sha256": sha(tiny_rtx_set / rel), "bytes": (tiny_rtx_set / rel).stat().st_size}
        assert e["aids"] == {"vae_tile": None, "residency": "resident", "weight_streaming": False, "auto": False}
        assert e["build"]["skipped"] is False and e["build"]["seconds"] > 0
        assert 50 << 20 < e["build"]["peak_rss_bytes"] < 8 << 30  # its own process's peak, a Python + TensorRT-RTX build
        assert len(e["inputs_sha256"]) == 64
    rows = d["summary"]
    assert [(r["card"], r["component"]) for r in rows] == [(c, x) for c in RTX_SET_CARDS
                                                           for x in ("text_encoder", "text_encoder_2", "unet", "vae_decoder")]
    assert all(r["mib"] > 0 and r["peak_rss_mib"] > 50 for r in rows)


def test_inspect_a_set(tiny_rtx_set: Path) -> None:
    code, out, err = run_cli("inspect", tiny_rtx_set)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:4] == [f"engine set {tiny_rtx_set}: 3 card(s)",
                         f"  rtx2080ti (sm_75, TensorRT-RTX {RTX_VERSION}) in rtx2080ti/; memory aids: none",
                         f"  rtx3060ti (sm_86, TensorRT-RTX {RTX_VERSION}) in rtx3060ti/; memory aids: none",
                         f"  rtx4090 (sm_89, TensorRT-RTX {RTX_VERSION}) in rtx4090/; memory aids: none"]
    assert lines[4].split() == ["card", "component", "precision", "MiB", "build", "s", "peak", "RSS", "MiB"]
    assert len(lines) == 6 + 12


def test_an_unchanged_card_is_skipped(tiny_artifacts: Path, tiny_fp16_gemm: Path, tiny_rtx_set: Path, tmp_path: Path) -> None:
    """The same command again builds nothing; a card whose files no longer match the index is built
    again (TensorRT-RTX builds are deterministic here: the same bytes), the others are skipped."""
    s = tmp_path / "set"
    shutil.copytree(tiny_rtx_set, s)
    before = {p: p.stat().st_mtime_ns for p in s.rglob("*.plan")}
    code, out, err = run_cli(*build_args(tiny_artifacts, tiny_fp16_gemm, s))
    assert code == 0, err[-2000:]
    assert all(f"[{c}] skipped: unchanged (same ONNX inputs, flags, profile and library)" in err for c in RTX_SET_CARDS)
    assert {p: p.stat().st_mtime_ns for p in s.rglob("*.plan")} == before
    assert all(e["build"]["skipped"] for e in index(s)["cards"].values())
    # a damaged rtx4090 engine: that card is rebuilt, the others are not
    unet = s / index(s)["cards"]["rtx4090"]["engines"]["unet"]["file"]
    unet = s / "rtx4090" / unet.name
    good = unet.read_bytes()
    unet.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    code, out, err = run_cli(*build_args(tiny_artifacts, tiny_fp16_gemm, s))
    assert code == 0, err[-2000:]
    assert f"[rtx4090] building: its files do not match the index (rtx4090/{unet.name} does not match its sha256)" in err
    assert "[rtx3060ti] skipped" in err and "[rtx2080ti] skipped" in err
    d = index(s)
    assert [c for c, e in d["cards"].items() if not e["build"]["skipped"]] == ["rtx4090"]
    assert d["cards"]["rtx4090"]["files"][f"rtx4090/{unet.name}"]["sha256"] == sha(unet) != sha256_of(good[:-1] + bytes([good[-1] ^ 1]))
    assert {p: p.stat().st_mtime_ns for p in s.rglob("*.plan") if p.parent.name != "rtx4090"} == {
        p: t for p, t in before.items() if p.parent.name != "rtx4090"}
    assert out.splitlines()[0].split() == ["card", "component", "precision", "MiB", "build", "s", "peak", "RSS", "MiB"]
    # --dry-run says what a build would do, builds nothing; --force rebuilds every card listed
    code, out, err = run_cli(*build_args(tiny_artifacts, tiny_fp16_gemm, s), "--dry-run", "--json")
    assert code == 0, err
    assert {c: v["action"] for c, v in json.loads(out)["cards"].items()} == dict.fromkeys(RTX_SET_CARDS, "skip")
    code, out, err = run_cli(*build_args(tiny_artifacts, tiny_fp16_gemm, s), "--dry-run", "--json", "--force")
    assert {c: (v["action"], v["why"]) for c, v in json.loads(out)["cards"].items()} == dict.fromkeys(
        RTX_SET_CARDS, ("build", "--force"))
    # one card named, --out an engine set: that card of the set (the others are kept)
    code, out, err = run_cli(*build_args(tiny_artifacts, tiny_fp16_gemm, s, "rtx4090"), "--dry-run", "--json")
    assert code == 0, err
    assert {c: v["action"] for c, v in json.loads(out)["cards"].items()} == {"rtx4090": "skip"}
    # another precision is another input: every card would be built again
    code, out, err = run_cli(*build_args(tiny_artifacts, tiny_fp16_gemm, s, "rtx3060ti,rtx4090"), "--precision", "fp32",
                             "--dry-run", "--json")
    assert code == 0, err
    assert {c: v["action"] for c, v in json.loads(out)["cards"].items()} == {"rtx3060ti": "build", "rtx4090": "build"}


# ----- the run-time choice ----------------------------------------------------------------------------
@pytest.mark.parametrize("gpu, version, card", [
    (RTX2080TI, RTX_VERSION, "rtx2080ti"),
    (RTX3060TI, RTX_VERSION, "rtx3060ti"),
    (RTX4090, RTX_VERSION, "rtx4090"),
    (A10, RTX_VERSION, "rtx3060ti"),  # another sm_86 card with more memory runs the 8 GB card's engines
    (RTX4060, RTX_VERSION, None),  # sm_89, but rtx4090's engines were planned for 23.5 GiB
    (RTX5090, RTX_VERSION, None),  # sm_120: no card of the set targets it
    (H100, RTX_VERSION, None),
    (RTX4090, "1.8.0.12", None),  # another TensorRT-RTX release
    (RTX4090, None, None),  # TensorRT-RTX not installed
], ids=lambda v: getattr(v, "name", v))
def test_the_card_that_runs_here(tiny_rtx_set: Path, gpu: DeviceInfo, version: str | None, card: str | None) -> None:
    from engines.engine_set import resolve_engines
    from koala_core.errors import UsageError

    facts = MachineFacts((gpu,), tensorrt_rtx=version)
    said: list[str] = []
    if card is not None:
        assert resolve_engines(tiny_rtx_set, facts, said.append) == tiny_rtx_set / card
        cc = {"rtx2080ti": "sm_75", "rtx3060ti": "sm_86", "rtx4090": "sm_89"}[card]
        assert said == [f"using {tiny_rtx_set / card} (card {card}: {cc}, TensorRT-RTX {RTX_VERSION}; this GPU: {gpu.name}, "
                        f"sm_{gpu.sm}, {gpu.memory_bytes / GIB:.1f} GiB)"]
        return
    with pytest.raises(UsageError) as e:
        resolve_engines(tiny_rtx_set, facts, said.append)
    line = str(e.value)
    lib = f"TensorRT-RTX {version or 'not installed'}"
    have = ", ".join(f"{c} ({cc}, TensorRT-RTX {RTX_VERSION})" for c, cc in
                     (("rtx2080ti", "sm_75"), ("rtx3060ti", "sm_86"), ("rtx4090", "sm_89")))
    assert line.startswith(f"no card of the engine set {tiny_rtx_set} runs here: this machine has {gpu.name} (sm_{gpu.sm}, "
                           f"{gpu.memory_bytes / GIB:.1f} GiB), {lib}; the set has {have}")
    if gpu is RTX4060:
        assert line.endswith("(rtx4090: planned for 23.5 GiB of usable device memory but NVIDIA GeForce RTX 4060 has 7.6 GiB)")
    elif version == "1.8.0.12":
        assert line.endswith(f"(rtx4090: built with TensorRT-RTX {RTX_VERSION} but this machine has TensorRT-RTX 1.8.0.12: "
                             "TensorRT-RTX engines load only in the TensorRT-RTX release that built them)")
    elif version is None:
        assert line.endswith(f"(rtx4090: built with TensorRT-RTX {RTX_VERSION} but TensorRT-RTX is not installed here "
                             "(no `tensorrt_rtx` Python module))")
    else:
        assert line.endswith(have)
    assert "\n" not in line and not said


def fake_machine(monkeypatch: pytest.MonkeyPatch, gpu: DeviceInfo | None, rtx_version: str | None) -> None:
    """This machine's facts as the gatherers would report them: the GPU cuda-python would see, and the
    TensorRT-RTX version the package probe would read. Nothing else is replaced."""
    import engines.compat as compat

    monkeypatch.setattr(compat, "gpus_from_cuda", lambda: ((gpu,), "") if gpu else ((), "cuda-python is not installed"))
    monkeypatch.setattr(compat, "gpus_from_nvidia_smi", lambda: ((), "no NVIDIA GPU found on this machine"))
    monkeypatch.setattr(compat, "installed_version", lambda m: rtx_version if m == "tensorrt_rtx" else None)


def test_generate_says_which_card(tiny_rtx_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """generate --engines SET on an RTX 3060 Ti opens SET/rtx3060ti (here it then stops: no cuda-python)."""
    fake_machine(monkeypatch, RTX3060TI, RTX_VERSION)
    code, _, err = run_cli("generate", "--backend", "tensorrt", "--engines", tiny_rtx_set, "--prompt", "a koala",
                           "--steps", "1", "--out", tmp_path / "x.png")
    assert f"using {tiny_rtx_set / 'rtx3060ti'} (card rtx3060ti: sm_86, TensorRT-RTX {RTX_VERSION}; this GPU: " in err
    assert code == 1 and last_error(err).startswith(
        f"Error: the TensorRT backend cannot run the tensorrt-rtx engines of {tiny_rtx_set / 'rtx3060ti'} on this "
        "machine, missing: cuda-python")
    # none fits: one line, exit 2, before any model work
    fake_machine(monkeypatch, RTX4090, "1.8.0.12")
    code, _, err = run_cli("generate", "--backend", "tensorrt", "--engines", tiny_rtx_set, "--prompt", "a koala",
                           "--steps", "1", "--out", tmp_path / "x.png")
    assert code == 2 and last_error(err).startswith(f"Error: no card of the engine set {tiny_rtx_set} runs here: this "
                                                    "machine has NVIDIA GeForce RTX 4090 (sm_89, 24.0 GiB), TensorRT-RTX 1.8.0.12;")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_a_set_whose_files_do_not_match_its_index(tiny_rtx_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = tmp_path / "set"
    shutil.copytree(tiny_rtx_set, s)
    fake_machine(monkeypatch, RTX3060TI, RTX_VERSION)
    m = s / "rtx3060ti" / "manifest.json"
    m.write_text(m.read_text().replace('"cuda_graphs": true', '"cuda_graphs": 1234'))  # same size, another sha256
    code, _, err = run_cli("generate", "--backend", "tensorrt", "--engines", s, "--prompt", "a", "--out", tmp_path / "x.png")
    assert (code, last_error(err)) == (1, (
        f"Error: {s / 'engines-index.json'} does not match its files: rtx3060ti/manifest.json does not match its sha256 "
        f"(changed or corrupt); rebuild the card with `koala-trt build --profile rtx3060ti ... --out {s}` or the set "
        "with --force"))
    (s / "engines-index.json").write_text("{not json")
    code, _, err = run_cli("generate", "--backend", "tensorrt", "--engines", s, "--prompt", "a", "--out", tmp_path / "x.png")
    assert code == 1 and last_error(err).startswith(f"Error: {s / 'engines-index.json'} is corrupt (")


# ----- bad input: one line, nothing written -------------------------------------------------------------
@pytest.mark.parametrize("cards, extra, line", [
    ("rtx4090,rtx9999", (), "unknown card 'rtx9999' in --profile rtx4090,rtx9999; known cards: a10, a100-40gb, a100-80gb, "
                            "h100-80gb, jetson-agx-orin, l4, rtx-portable, rtx2080ti, rtx3060ti, rtx4090, rtx5090, all-rtx "
                            "(or the path of a profile .toml)"),
    ("rtx4090,rtx3060ti,rtx4090", (), "card rtx4090 is listed twice in --profile rtx4090,rtx3060ti,rtx4090"),
    ("all-rtx,rtx4090", (), "card rtx4090 is listed twice in --profile all-rtx,rtx4090"),
    ("rtx4090,h100-80gb", (), "card h100-80gb builds with tensorrt on the card itself; a set of several cards is built here "
                              "with TensorRT-RTX: TensorRT-RTX cannot target h100-80gb's sm_90; build it on the card on its "
                              "own (koala-trt build --profile h100-80gb)"),
    ("rtx4090,h100-80gb", ("--library", "tensorrt-rtx"),
     "--library tensorrt-rtx cannot build for h100-80gb (sm_90): tensorrt-rtx targets sm_75, sm_80, sm_86, sm_89, sm_120, "
     "sm_121; use --library tensorrt and build on the card"),
    ("rtx4090,l4", (), "card l4 builds with tensorrt on the card itself; a set of several cards is built here with "
                       "TensorRT-RTX: pass --library tensorrt-rtx (it can target sm_89)"),
    ("rtx4090,", (), "--profile rtx4090, has an empty card name; known cards: a10, a100-40gb, a100-80gb, h100-80gb, "
                     "jetson-agx-orin, l4, rtx-portable, rtx2080ti, rtx3060ti, rtx4090, rtx5090, all-rtx"),
])
def test_bad_card_lists(tiny_artifacts: Path, tiny_fp16_gemm: Path, tmp_path: Path, cards: str, extra: tuple,
                        line: str) -> None:
    out = tmp_path / "set"
    code, _, err = run_cli(*build_args(tiny_artifacts, tiny_fp16_gemm, out, cards), *extra)
    assert (code, last_error(err)) == (2, f"Error: {line}")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_all_rtx_is_the_four_geforce_cards() -> None:
    from engines.engine_set import all_rtx, parse_cards

    assert all_rtx() == ["rtx2080ti", "rtx3060ti", "rtx4090", "rtx5090"]
    assert [p.name for p in parse_cards("all-rtx")] == all_rtx()


def test_a_corrupt_index_is_not_overwritten(tiny_artifacts: Path, tiny_fp16_gemm: Path, tmp_path: Path) -> None:
    s = tmp_path / "set"
    s.mkdir()
    (s / "engines-index.json").write_text("{not json")
    code, _, err = run_cli(*build_args(tiny_artifacts, tiny_fp16_gemm, s))
    assert code == 1 and last_error(err).startswith(f"Error: {s / 'engines-index.json'} is corrupt (")
    assert (s / "engines-index.json").read_text() == "{not json" and sorted(p.name for p in s.iterdir()) == ["engines-index.json"]
    one = tmp_path / "one"
    one.mkdir()
    (one / "manifest.json").write_text("{}")
    code, _, err = run_cli(*build_args(tiny_artifacts, tiny_fp16_gemm, one))
    assert (code, last_error(err)) == (2, f"Error: {one} is the engines folder of one card (manifest.json), not an engine "
                                          "set; choose another --out (or remove it)")


# ----- bundles -------------------------------------------------------------------------------------------
def test_pack_verify_unpack_a_set(tiny_artifacts: Path, tiny_rtx_set: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from engines.engine_set import resolve_engines

    whole, one = tmp_path / "set.tar.gz", tmp_path / "rtx4090.tar.gz"
    code, _, err = run_cli("pack", "--artifacts", tiny_artifacts, "--engines", tiny_rtx_set, "--out", whole, "--level", "0")
    assert code == 0, err
    code, out, err = run_cli("pack", "--artifacts", tiny_artifacts, "--engines", tiny_rtx_set, "--card", "rtx4090",
                             "--out", one, "--level", "0", "--json")
    assert code == 0, err
    req = json.loads(out)["requirements"]
    assert list(req["engine_set"]["cards"]) == ["rtx4090"] and req["backend"] == "tensorrt"
    with tarfile.open(whole) as t:
        names = t.getnames()
    assert {n.split("/")[1] for n in names if n.startswith("engines/") and n.count("/") == 2} == set(RTX_SET_CARDS)
    with tarfile.open(one) as t:
        names = t.getnames()
    cards_in = {n.split("/")[1] for n in names if n.startswith("engines/") and n.count("/") == 2}
    assert cards_in == {"rtx4090"} and "engines/engines-index.json" in names
    # verify on the target machine names the folder it would use
    fake_machine(monkeypatch, RTX3060TI, RTX_VERSION)
    code, out, err = run_cli("verify", whole)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == (f"this machine: NVIDIA GeForce RTX 3060 Ti (8.6), TensorRT-RTX {RTX_VERSION}: "
                                            f"would use {whole / 'engines' / 'rtx3060ti'}")
    code, out, err = run_cli("verify", one)  # rtx4090's share only: nothing for this 3060 Ti
    assert code == 1 and last_error(err).startswith(
        f"Error: {one}: no card of the bundle's engine set runs here: this machine has NVIDIA GeForce RTX 3060 Ti (sm_86, "
        f"7.8 GiB), TensorRT-RTX {RTX_VERSION}; the set has rtx4090 (sm_89, TensorRT-RTX {RTX_VERSION}); build the set")
    # unpacked, the share is an engine set of one card that --engines resolves like any other
    u = tmp_path / "u"
    code, _, err = run_cli("unpack", one, "--out", u)
    assert code == 0, err
    assert list(index(u / "engines")["cards"]) == ["rtx4090"]
    assert resolve_engines(u / "engines", MachineFacts((RTX4090,), tensorrt_rtx=RTX_VERSION)) == u / "engines" / "rtx4090"
    fake_machine(monkeypatch, RTX4090, RTX_VERSION)
    code, out, err = run_cli("verify", u)
    assert code == 0 and out.strip().endswith(f"would use {u / 'engines' / 'rtx4090'}"), err
    # an unpacked set whose index and files disagree is refused
    plan = next((u / "engines" / "rtx4090").glob("unet.*.plan"))
    plan.write_bytes(plan.read_bytes()[:-1] + b"\0")
    code, _, err = run_cli("verify", u, "--no-device-check")
    assert code == 1 and f"engines/rtx4090/{plan.name} does not match its sha256 in bundle.json" in last_error(err)
    code, _, err = run_cli("pack", "--artifacts", tiny_artifacts, "--engines", tiny_rtx_set, "--card", "rtx5090",
                           "--out", tmp_path / "x.tar.gz")
    assert (code, last_error(err)) == (2, f"Error: --card rtx5090: the engine set {tiny_rtx_set} has rtx2080ti, rtx3060ti, "
                                          "rtx4090")
    assert not (tmp_path / "x.tar.gz").exists()


def test_auto_plans_every_card(tiny_artifacts: Path, tiny_fp16_gemm: Path, tmp_path: Path) -> None:
    """--auto: the planner's choice is made per card (and the card's process builds with it; the index
    records the aids and auto). random:tiny fits every card with the profile's own settings."""
    args = [a for a in build_args(tiny_artifacts, tiny_fp16_gemm, tmp_path / "set", "rtx3060ti,rtx2080ti")
            if a != "--no-estimate"]
    code, out, err = run_cli(*args, "--auto", "--dry-run", "--json")
    assert code == 0, err
    for card in ("rtx3060ti", "rtx2080ti"):
        assert f"[{card}] --auto: the profile's own settings (margin +" in err
    d = json.loads(out)["cards"]
    assert list(d) == ["rtx3060ti", "rtx2080ti"] and all(v["action"] == "build" for v in d.values())
    assert not (tmp_path / "set").exists()
