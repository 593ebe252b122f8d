"""Engines with a LoRA: TensorRT-RTX engines rebuilt here (no GPU) from a `koala-trt lora` folder,
the adapters they carry recorded in the engines manifest and shown by `inspect` and `verify`;
`koala-trt refit` refusing what it cannot refit (here) and refitting standard TensorRT engines built
with refit = "weights" (gpu-marked, on a card with standard TensorRT).

The TensorRT-RTX builds run `koala-trt build` in processes of their own (Polygraphy picks its
TensorRT once per process), as tests/test_rtx_build.py does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from test_lora import LAYERS, make_adapter

SIZE = ("--height", "128", "--width", "128", "--batch", "1")
SCALE = 0.8
RTX = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                         reason="TensorRT-RTX is not installed (make install installs it)")


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def last_error(err: str) -> str:
    assert "Traceback" not in err, err[-2000:]
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def lora(tiny_source, tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the adapter, the tiny export with it patched in at SCALE): U-Net and both text encoders."""
    d = tmp_path_factory.mktemp("lora-engines")
    adapter = d / "style.safetensors"
    make_adapter(tiny_source, adapter, layers=LAYERS, seed=11)
    out = d / "patched"
    code, _, err = run_cli("lora", "--artifacts", tiny_artifacts, "--lora", f"{adapter}:{SCALE}", "--out", out)
    assert code == 0, err
    return adapter, out


@pytest.fixture(scope="module")
def rtx_engines(tiny_artifacts: Path, lora: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """rtx3060ti U-Net engines (FP32, 128 px) of the plain and of the patched export, built on this CPU."""
    from test_rtx_build import koala

    out = tmp_path_factory.mktemp("lora-rtx")
    built = {}
    for name, src in (("plain", tiny_artifacts), ("lora", lora[1])):
        koala("build", "--onnx", src, "--profile", "rtx3060ti", "--precision", "fp32", "-c", "unet", *SIZE,
              "--no-estimate", "--out", out / name)
        built[name] = out / name
    return built


def _plan(folder: Path) -> tuple[dict, Path]:
    e = json.loads((folder / "manifest.json").read_text())["engines"]["unet"]
    return e, folder / e["file"]


@RTX
def test_rtx_engine_rebuilt_from_the_patched_folder(tiny_artifacts: Path, lora: tuple[Path, Path],
                                                    rtx_engines: dict[str, Path]) -> None:
    import onnx
    from onnx import numpy_helper

    adapter, patched = lora
    plain, plain_plan = _plan(rtx_engines["plain"])
    withlora, lora_plan = _plan(rtx_engines["lora"])
    # the record: the adapter's own sha256 (hashed here), its scale, the U-Net layers it adapts (5 of LAYERS)
    assert plain["loras"] == []
    assert withlora["loras"] == [{"file": "style.safetensors", "sha256": sha256(adapter), "scale": SCALE,
                                  "format": "peft", "layers": {"unet": 5}}]
    assert withlora["source"]["artifacts"] == str(patched.resolve())
    assert sha256(lora_plan) == withlora["sha256"] != plain["sha256"] == sha256(plain_plan)
    # the engine holds the patched weights: of the adapted initializers the plain plan stores verbatim
    # (TensorRT-RTX keeps some FP32 weights as they are, reorders others), the patched plan holds the
    # new bytes and not the old ones
    def weights(folder: Path) -> dict[str, np.ndarray]:
        g = onnx.load(str(folder / "unet" / "model.onnx"))
        return {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}

    old, new = weights(tiny_artifacts), weights(patched)
    changed = [k for k in old if not np.array_equal(old[k], new[k])]
    assert len(changed) == 5
    a, b = plain_plan.read_bytes(), lora_plan.read_bytes()
    verbatim = [k for k in changed if old[k].tobytes() in a]
    assert verbatim, "no adapted weight is stored verbatim in the plain plan: the check below would be empty"
    for k in verbatim:
        assert new[k].tobytes() in b and old[k].tobytes() not in b, k


@RTX
def test_inspect_shows_the_adapters(lora: tuple[Path, Path], rtx_engines: dict[str, Path]) -> None:
    adapter, patched = lora
    short = sha256(adapter)[:12]
    code, out, err = run_cli("inspect", rtx_engines["lora"])
    assert code == 0, err
    assert out.splitlines()[0] == f"engines {rtx_engines['lora']}: tensorrt-rtx " \
                                  f"{json.loads((rtx_engines['lora'] / 'manifest.json').read_text())['library']['version']} " \
                                  "for sm_86, built on a CPU; refit none"
    row = [ln for ln in out.splitlines() if ln.startswith("unet ")]
    assert len(row) == 1 and row[0].endswith(f"style.safetensors x0.8 ({short})"), out
    code, out, err = run_cli("inspect", rtx_engines["lora"], "--json")
    assert json.loads(out)["engines"]["unet"]["loras"][0]["sha256"] == sha256(adapter)
    code, out, err = run_cli("inspect", patched)
    assert code == 0, err
    assert f"LoRA style.safetensors x0.8 (sha256 {short}): layers unet 5, text_encoder 2, text_encoder_2 1" in out.splitlines()


@RTX
def test_verify_reports_engines_without_the_artifacts_adapters(lora: tuple[Path, Path], rtx_engines: dict[str, Path],
                                                               tmp_path: Path) -> None:
    adapter, patched = lora
    short = sha256(adapter)[:12]
    for engines, mismatch in ((rtx_engines["plain"], True), (rtx_engines["lora"], False)):
        bundle = tmp_path / f"{engines.name}.tar.gz"
        code, _, err = run_cli("pack", "--artifacts", patched, "--engines", engines, "--out", bundle, "--level", "0")
        assert code == 0, err
        code, out, err = run_cli("verify", bundle, "--no-device-check")
        assert code == 0, err  # reported, not refused: the bundle itself is intact
        assert f"LoRA style.safetensors x0.8 (sha256 {short}) in the weights of unet, text_encoder, text_encoder_2" in out
        warnings = [ln for ln in err.splitlines() if ln.startswith("warning: LoRA")]
        want = ("warning: LoRA adapters differ between the bundle's engines/manifest.json and the artifacts: unet engine "
                f"has none, the artifacts' unet has style.safetensors x0.8 (sha256 {short}); rebuild the engines from the "
                "artifacts (koala-trt build), or refit refittable TensorRT engines (koala-trt refit)")
        assert warnings == ([want] if mismatch else []), err


@RTX
def test_refit_refuses_tensorrt_rtx_engines(lora: tuple[Path, Path], rtx_engines: dict[str, Path]) -> None:
    _, patched = lora
    e = rtx_engines["plain"]
    before = sha256(_plan(e)[1])
    code, _, err = run_cli("refit", "--engines", e, "--artifacts", patched)
    assert code == 2
    assert last_error(err) == (
        f"Error: {e}: TensorRT-RTX engines are not refitted (TensorRT-RTX 1.7 builds refittable engines only on a GPU, "
        "and koala-trt builds them on the CPU without refit); rebuild them from the patched folder (TensorRT-RTX builds "
        f"on a CPU): koala-trt build --onnx {patched} --profile rtx3060ti --out {e} --components unet --precision fp32 "
        "--batch 1 --height 128 --width 128 --force")
    assert sha256(_plan(e)[1]) == before


@pytest.mark.parametrize("refit, how", [
    ("none", "without refit"),
    ("identical", 'with refit = "identical" (REFIT_IDENTICAL + STRIP_PLAN: they take only the weights they were built from)'),
])
def test_refit_refuses_engines_not_built_refittable(tiny_artifacts: Path, lora: tuple[Path, Path], tmp_path: Path,
                                                    refit: str, how: str) -> None:
    from engines_helpers import fake_engines_dir

    _, patched = lora
    e = fake_engines_dir(tiny_artifacts, tmp_path / "e", refit=refit)  # a manifest only: refused before TensorRT
    code, _, err = run_cli("refit", "--engines", e, "--artifacts", patched)
    assert code == 2
    assert last_error(err) == (
        f"Error: {e}: the engines were built {how}; build them refittable with refit = \"weights\" in the profile's "
        f"[build] table, or rebuild them from the patched folder: koala-trt build --onnx {patched} --profile rtx4090 "
        f"--out {e} --precision fp32 --height 256 --width 256 --force")


def test_refit_checks_the_artifacts_before_the_gpu(tiny_artifacts: Path, lora: tuple[Path, Path], tmp_path: Path) -> None:
    """A refittable folder (manifest only): the wrong precision and a missing component are refused
    first; with matching artifacts the refusal is the missing TensorRT/GPU, and nothing is written."""
    from engines_helpers import fake_engines_dir, relabelled_copy

    _, patched = lora
    e = fake_engines_dir(tiny_artifacts, tmp_path / "e", refit="weights")
    before = (e / "manifest.json").read_bytes()
    fp16 = relabelled_copy(patched, tmp_path / "fp16", {"unet": "fp16"})
    code, _, err = run_cli("refit", "--engines", e, "--artifacts", fp16, "-c", "unet")
    assert (code, last_error(err)) == (2, f"Error: the unet engine is fp32 but {fp16}'s unet is fp16: refit from the "
                                          "patched folder of the precision the engine was built from")
    code, _, err = run_cli("refit", "--engines", e, "--artifacts", patched, "-c", "unet", "--out", tmp_path / "new")
    if importlib.util.find_spec("tensorrt") is None:
        assert code == 1 and last_error(err).startswith("Error: cannot refit TensorRT engines on this machine, missing: "
                                                        "TensorRT (the tensorrt Python package")
    assert (e / "manifest.json").read_bytes() == before and not (tmp_path / "new").exists()


def test_refit_weights_profile_flags(tiny_artifacts: Path, tmp_path: Path) -> None:
    from engines.buildplan import make_build_plan
    from engines.profile import load_profile
    from koala_core.errors import UsageError

    profiles = Path(__file__).parents[1] / "engines" / "profiles"

    own = tmp_path / "a10-refit.toml"
    own.write_text((profiles / "a10.toml").read_text().replace('refit = "none"', 'refit = "weights"'))
    code, out, err = run_cli("build", "--onnx", tiny_artifacts, "--profile", own, "--out", tmp_path / "e", "--precision",
                             "fp32", "--height", "256", "--width", "256", "--no-estimate", "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out)["flags"]["refit"] == "REFIT"
    profile = load_profile(str(own)).with_overrides(None, 256, 256, "fp32")
    make_build_plan([tiny_artifacts], profile, tmp_path / "e", ["unet"], "10.8.0.43", estimate=False)
    with pytest.raises(UsageError) as e:
        make_build_plan([tiny_artifacts], profile, tmp_path / "e", ["unet"], "11.3.0.7", estimate=False)
    assert str(e.value) == (f"{profile.name}: build.refit = \"weights\" builds with bare REFIT, which TensorRT 11.3.0.7 can get "
                            "wrong (NVIDIA's known issue in 11.3: a GEMM bias dropped); use another TensorRT version, or "
                            "refit = \"none\" and rebuild from each LoRA-patched folder")
    rtx = tmp_path / "rtx-refit.toml"
    rtx.write_text((profiles / "rtx3060ti.toml").read_text().replace('refit = "none"', 'refit = "weights"'))
    code, _, err = run_cli("build", "--onnx", tiny_artifacts, "--profile", rtx, "--out", tmp_path / "r", "--dry-run")
    assert code == 2
    assert last_error(err) == (f"Error: {rtx}: field build.refit = \"weights\": refit (REFIT) needs a GPU at build time "
                               "with TensorRT-RTX; build on the card with library = \"tensorrt\" or drop refit")


def test_engines_manifest_adapter_record_is_read_and_checked(tiny_artifacts: Path, tmp_path: Path) -> None:
    from engines.engine_manifest import load_engines_manifest
    from engines_helpers import fake_engines_dir
    from koala_core.errors import UsageError

    e = fake_engines_dir(tiny_artifacts, tmp_path / "e")
    m = json.loads((e / "manifest.json").read_text())
    assert all(entry["loras"] == [] for entry in m["engines"].values())
    del m["engines"]["text_encoder"]["loras"]  # written before koala-trt recorded adapters: none
    m["engines"]["unet"]["loras"] = [{"file": "a.safetensors", "sha256": "ab" * 32, "scale": 0.5, "format": "kohya",
                                      "layers": {"unet": 7}}]
    (e / "manifest.json").write_text(json.dumps(m))
    rec = load_engines_manifest(e).record
    assert rec.engines["text_encoder"].loras == ()
    (a,) = rec.engines["unet"].loras
    assert (a.file, a.sha256, a.scale, a.format, a.layers) == ("a.safetensors", "ab" * 32, 0.5, "kohya", {"unet": 7})
    m["engines"]["unet"]["loras"][0]["scale"] = "strong"
    (e / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UsageError) as err:
        load_engines_manifest(e)
    assert str(err.value) == f"{e / 'manifest.json'}: field engines.unet.loras[0].scale must be a number (got 'strong')"


# ----- on a GPU with standard TensorRT -------------------------------------------------------

def _gpu_reason() -> str | None:
    from test_trt_gpu import _REASON

    return _REASON


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=_gpu_reason() or "")
def test_refit_standard_tensorrt_engines_with_a_lora(tiny_artifacts: Path, lora: tuple[Path, Path], tmp_path: Path) -> None:
    """Built refittable from the plain export, refitted from the patched folder (U-Net and text
    encoder): outputs then match ONNX Runtime on the patched graphs, not on the plain ones; refitted
    back from the plain export, they match the plain graphs again."""
    from engines import cuda
    from runtime.tensorrt_backend import TensorRTBackend
    from test_trt_gpu import SIZE as PX, _compare, _local_profile, _reference

    adapter, patched = lora
    e = tmp_path / "engines"
    profile = _local_profile(tmp_path / "p.toml", cuda.device_info(), refit="weights")
    code, _, err = run_cli("build", "--onnx", tiny_artifacts, "--profile", profile, "--out", e, "-c", "unet,text_encoder")
    assert code == 0, err
    m = json.loads((e / "manifest.json").read_text())
    assert m["flags"]["refit"] == "REFIT" and not m["engines"]["unet"]["stripped"] and m["engines"]["unet"]["loras"] == []
    plain, lora_ref = _reference(tiny_artifacts), _reference(patched)
    feeds = {c: plain.specs[c].dummy_inputs(2, PX, PX, seed=5) for c in ("unet", "text_encoder")}
    for c in feeds:  # the adapter moves the outputs far beyond the 1e-3 engine tolerance, so the checks can fail
        from exporter.metrics import error_stats

        assert error_stats(plain.run(c, feeds[c])[plain.specs[c].outputs[0].name],
                           lora_ref.run(c, feeds[c])[plain.specs[c].outputs[0].name]).rel_l2 > 1e-2

    code, out, err = run_cli("refit", "--engines", e, "--artifacts", patched, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert sorted(r["refitted"]) == ["text_encoder", "unet"] and r["unchanged"] == []
    m = json.loads((e / "manifest.json").read_text())
    for c, layers in (("unet", 5), ("text_encoder", 2)):
        entry = m["engines"][c]
        assert entry["loras"] == [{"file": "style.safetensors", "sha256": sha256(adapter), "scale": SCALE,
                                   "format": "peft", "layers": {c: layers}}]
        assert sha256(e / entry["file"]) == entry["sha256"] and entry["source"]["artifacts"] == str(patched)
        assert entry["refit"]["weights"] > 0
    assert not list(tmp_path.glob(".engines.*"))  # the staging folder was renamed into place
    with TensorRTBackend(e) as b:
        for c in feeds:
            _compare(lora_ref.run(c, feeds[c]), b.run(c, feeds[c]), rel_l2=1e-3)
    code, out, err = run_cli("refit", "--engines", e, "--artifacts", patched, "--json")  # nothing left to do
    assert code == 0 and json.loads(out)["refitted"] == {}, err

    back = tmp_path / "back"
    code, _, err = run_cli("refit", "--engines", e, "--artifacts", tiny_artifacts, "--out", back)
    assert code == 0, err
    assert all(entry["loras"] == [] for entry in json.loads((back / "manifest.json").read_text())["engines"].values())
    with TensorRTBackend(back) as b:
        for c in feeds:
            _compare(plain.run(c, feeds[c]), b.run(c, feeds[c]), rel_l2=1e-3)


@RTX
def test_generate_reports_engines_without_the_artifacts_adapters(lora: tuple[Path, Path], rtx_engines: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    """--engines with --artifacts: the mismatch is said before the backend opens (which needs a GPU:
    here the run then stops with that error, on an RTX card it goes on)."""
    adapter, patched = lora
    e = rtx_engines["plain"]
    code, _, err = run_cli("generate", "--backend", "tensorrt", "--engines", e, "--artifacts", patched, "--prompt", "a koala",
                           "--height", "128", "--width", "128", "--steps", "1", "--out", tmp_path / "k.png")
    want = (f"warning: LoRA adapters differ between the engines in {e} and the artifacts: unet engine has none, the "
            f"artifacts' unet has style.safetensors x0.8 (sha256 {sha256(adapter)[:12]}); rebuild the engines from the "
            "artifacts (koala-trt build), or refit refittable TensorRT engines (koala-trt refit)")
    assert [ln for ln in err.splitlines() if ln.startswith("warning: LoRA")] == [want], err
    code, _, err = run_cli("generate", "--backend", "tensorrt", "--engines", rtx_engines["lora"], "--artifacts", patched,
                           "--prompt", "a koala", "--height", "128", "--width", "128", "--steps", "1", "--out", tmp_path / "k.png")
    assert not [ln for ln in err.splitlines() if ln.startswith("warning: LoRA")], err
