"""The build plan (`koala-trt build --dry-run`) for every shipped profile and precision, engine names,
shape checks against the export's recorded ranges, and the one-line error where TensorRT is missing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from engines.buildplan import engine_name
from engines.profile import builtin_names, load_profile
from exporter.specs import ShapeRange
from engines_helpers import relabelled_copy
from test_cli import assert_one_line_error

PROFILES_DIR = Path(__file__).parents[1] / "engines" / "profiles"
SIZE = ("--height", "256", "--width", "256")  # random:tiny exports cover 128..512 px


@pytest.fixture(scope="module")
def labelled(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("labelled")
    return {
        "fp16": relabelled_copy(tiny_artifacts, root / "fp16", {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16"}),
        "int8": relabelled_copy(tiny_artifacts, root / "int8", {"unet": "int8"}),
    }


def _dry_run(*args: object) -> dict:
    code, out, err = run_cli("build", *args, "--dry-run", "--json")
    assert code == 0, err
    return json.loads(out)


def _check_plan(plan: dict, profile: str, precisions: dict[str, str], folders: dict[str, Path]) -> None:
    p = load_profile(profile)
    from importlib import metadata

    rtx = p.build.library == "tensorrt-rtx"  # installed here (make install); standard TensorRT is not
    version = metadata.version("tensorrt-rtx-cu12") if rtx else None
    assert plan["dry_run"] and plan["profile"] == profile and plan["library"] == p.build.library
    assert plan["library_version"] == version and plan["targets"] == list(p.build.targets)
    assert list(plan["components"]) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    f = plan["flags"]
    assert f["strongly_typed"] is True and f["tf32"] is False and "FP16" not in json.dumps(f)
    assert f["builder_optimization_level"] == p.build.optimization_level
    assert f["workspace_bytes"] == int(p.build.workspace_gib * (1 << 30))
    for name, c in plan["components"].items():
        assert c["precision"] == precisions[name]
        assert c["onnx"] == str(folders[name].resolve() / name / "model.onnx")
        sm = "sm" + "-".join(t.replace(".", "") for t in p.build.targets)
        assert c["engine"].startswith(f"{name}.{precisions[name]}.")
        assert c["engine"].endswith(f".{sm}.rtx{version}.plan" if rtx else f".{sm}.trtnone.plan")
        assert c["memory"]["activations_bytes"] > 0 and c["memory"]["weights_from"] == "onnx files"
    b = p.shapes.batch
    unet = plan["components"]["unet"]["inputs"]["sample"]
    assert unet["min"] == [2 * b[0], 4, 32, 32] and unet["max"] == [2 * b[2], 4, 32, 32]
    ehs = plan["components"]["unet"]["inputs"]["encoder_hidden_states"]  # the export's 1..3 prompt chunks of 77
    assert (ehs["min"][1], ehs["opt"][1], ehs["max"][1]) == (77, 77, 231)
    assert plan["components"]["text_encoder"]["inputs"]["input_ids"]["max"] == [2 * b[2], 77]
    assert plan["components"]["vae_decoder"]["inputs"]["latent_sample"]["max"][0] == b[2]
    assert plan["memory"]["complete"] and plan["memory"]["fits"]
    assert plan["command"].startswith("koala-trt build --onnx ")


@pytest.mark.parametrize("profile", sorted(builtin_names()))
def test_dry_run_every_profile_and_precision(profile: str, tiny_artifacts: Path, labelled: dict[str, Path],
                                             tmp_path: Path) -> None:
    comps = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
    if profile == "rtx2080ti":  # Turing with TensorRT-RTX: no FP32 GEMMs (its real builds: tests/test_rtx_build.py)
        code, out, err = run_cli("build", "--onnx", tiny_artifacts, "--profile", profile, "--out", tmp_path / "e",
                                 "--precision", "fp32", *SIZE, "--dry-run")
        assert_one_line_error(code, err, 2, "rtx2080ti (sm_75, TensorRT-RTX) cannot build text_encoder in fp32")
        return
    # fp32: the export itself, precision chosen on the command line
    plan = _dry_run("--onnx", tiny_artifacts, "--profile", profile, "--out", tmp_path / "e", "--precision", "fp32", *SIZE)
    _check_plan(plan, profile, dict.fromkeys(comps, "fp32"), dict.fromkeys(comps, tiny_artifacts))
    # fp16: the profile's own precision, from a folder recording fp16 (the VAE stays fp32 by policy)
    plan = _dry_run("--onnx", tiny_artifacts, "--onnx", labelled["fp16"], "--profile", profile, "--out", tmp_path / "e", *SIZE)
    want = {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32"}
    _check_plan(plan, profile, want, {c: labelled["fp16"] if want[c] == "fp16" else tiny_artifacts for c in comps})
    # int8 U-Net: the user's copy of the shipped profile; each component from the folder holding its precision
    own = tmp_path / f"{profile}-int8.toml"
    own.write_text((PROFILES_DIR / f"{profile}.toml").read_text().replace('unet = "fp16"', 'unet = "int8"'))
    plan = _dry_run("--onnx", tiny_artifacts, "--onnx", labelled["fp16"], "--onnx", labelled["int8"], "--profile", own,
                    "--out", tmp_path / "e", *SIZE)
    plan["profile"] = profile  # the TOML copy keeps the built-in's name
    want = {**want, "unet": "int8"}
    _check_plan(plan, profile, want, {"text_encoder": labelled["fp16"], "text_encoder_2": labelled["fp16"],
                                      "unet": labelled["int8"], "vae_decoder": tiny_artifacts})


def test_engine_names_encode_component_precision_shapes_card_and_tensorrt() -> None:
    static = ShapeRange((2, 2, 2), (1024,) * 3, (1024,) * 3)
    assert engine_name("unet", "fp16", static, True, "8.6", "10.8.0.43") == "unet.fp16.b2.1024x1024.sm86.trt10.8.0.43.plan"
    dynamic = ShapeRange((1, 2, 8), (768, 1024, 1024), (1024, 1024, 1536))
    assert (engine_name("unet", "int8", dynamic, True, "8.9", "11.0.1") ==
            "unet.int8.b1-2-8.768-1024-1024x1024-1024-1536.sm89.trt11.0.1.plan")
    assert engine_name("text_encoder_2", "fp16", dynamic, False, "7.5", "10.8") == "text_encoder_2.fp16.b1-2-8.sm75.trt10.8.plan"
    assert engine_name("vae_decoder", "fp32", static, True, "8.6", None, "ampere_plus").endswith(".sm80plus.trtnone.plan")


def test_shape_outside_the_exported_range_names_component_input_and_limit(tiny_artifacts: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("build", "--onnx", tiny_artifacts, "--profile", "rtx3060ti", "--out", tmp_path / "e",
                           "--precision", "fp32", "--dry-run", "--no-estimate")  # the profile's 1024 px > 512
    assert_one_line_error(code, err, 2, "unet: input sample", "height 1024 px", "at most 512 px")
    code, _, err = run_cli("build", "--onnx", tiny_artifacts, "--profile", "rtx3060ti", "--out", tmp_path / "e",
                           "--precision", "fp32", "--height", "64", "--width", "256", "--dry-run", "--no-estimate")
    assert_one_line_error(code, err, 2, "unet: input sample", "height 64 px", "at least 128 px")
    code, _, err = run_cli("build", "--onnx", tiny_artifacts, "--profile", "rtx3060ti", "--out", tmp_path / "e",
                           "--precision", "fp32", "--batch", "9", *SIZE, "--dry-run", "--no-estimate")
    assert_one_line_error(code, err, 2, "text_encoder: input input_ids", "batch 18", "at most 8")
    code, _, err = run_cli("build", "--onnx", tiny_artifacts, "--profile", "rtx3060ti", "--out", tmp_path / "e",
                           "--precision", "fp32", "--height", "240", "--width", "256", "--dry-run", "--no-estimate")
    assert_one_line_error(code, err, 2, "unet", "multiples of 32")


def test_missing_precision_or_component_is_a_usage_error(tiny_artifacts: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("build", "--onnx", tiny_artifacts, "--profile", "rtx4090", "--out", tmp_path / "e",
                           *SIZE, "--dry-run", "--no-estimate")
    assert_one_line_error(code, err, 2, "wants text_encoder in fp16", "holds fp32", "koala-trt convert")
    code, _, err = run_cli("build", "--onnx", tiny_artifacts, "--profile", "rtx4090", "--out", tmp_path / "e",
                           "--precision", "fp32", "--components", "vae_encoder", *SIZE, "--dry-run", "--no-estimate")
    assert_one_line_error(code, err, 2, "no --onnx folder holds vae_encoder")


def test_plan_records_source_sha256_and_components_subset(tiny_artifacts: Path, tmp_path: Path) -> None:
    plan = _dry_run("--onnx", tiny_artifacts, "--profile", "l4", "--out", tmp_path / "e", "--precision", "fp32",
                    "--components", "unet", *SIZE, "--no-estimate")
    recorded = json.loads((tiny_artifacts / "manifest.json").read_text())["files"]["unet/model.onnx"]["sha256"]
    assert list(plan["components"]) == ["unet"] and plan["components"]["unet"]["onnx_sha256"] == recorded
    assert plan["memory"] is None
    assert "--components unet" in plan["command"] and "--precision fp32" in plan["command"]


def test_dry_run_never_imports_tensorrt(tiny_artifacts: Path, tmp_path: Path) -> None:
    poison = tmp_path / "poison" / "tensorrt"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('the dry run imported tensorrt')\n")
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(poison.parent), str(root)])}
    r = subprocess.run([sys.executable, "-m", "koala_trt.cli", "build", "--onnx", str(tiny_artifacts), "--profile",
                        "rtx3060ti", "--out", str(tmp_path / "e"), "--precision", "fp32", *SIZE, "--dry-run",
                        "--no-estimate"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "unet.fp32.b2.256x256.sm86" in r.stdout


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_without_tensorrt_is_one_line_saying_what_is_missing(tiny_artifacts: Path, tmp_path: Path) -> None:
    for args in (("--profile", "a10"), ("--profile", "rtx3060ti", "--library", "tensorrt")):
        code, out, err = run_cli("build", "--onnx", tiny_artifacts, *args, "--out", tmp_path / "e",
                                 "--precision", "fp32", *SIZE)
        assert_one_line_error(code, err, 1, "Error: cannot build tensorrt engines on this machine, missing: TensorRT "
                              "(the tensorrt Python package: standard TensorRT, from NVIDIA's index: pip install "
                              "'koala-trt[gpu]')", "--dry-run")
        assert not (tmp_path / "e").exists() and out == ""


def test_compatibility_and_refit_flags_in_the_plan(tiny_artifacts: Path, tmp_path: Path) -> None:
    own = tmp_path / "portable.toml"
    own.write_text((PROFILES_DIR / "a10.toml").read_text()
                   .replace('hardware_compatibility = "none"', 'hardware_compatibility = "ampere_plus"')
                   .replace("version_compatible = false", "version_compatible = true")
                   .replace('refit = "none"', 'refit = "identical"'))
    plan = _dry_run("--onnx", tiny_artifacts, "--profile", own, "--out", tmp_path / "e", "--precision", "fp32",
                    *SIZE, "--no-estimate")
    f = plan["flags"]
    assert (f["hardware_compatibility"], f["version_compatible"], f["refit"]) == ("ampere_plus", True,
                                                                                  "REFIT_IDENTICAL+STRIP_PLAN")
    assert all(".sm80plus." in c["engine"] for c in plan["components"].values())


def test_tensorrt_is_called_from_one_module_strongly_typed_only() -> None:
    """Every `import tensorrt` is in engines/trt.py, and it never uses the weak-typing API removed in
    TensorRT 11 (FP16/INT8 builder flags, calibrators) nor CreateConfig's `refittable` (bare REFIT
    behind the profile's back). Bare REFIT is set by name only for refit = "weights", which the build
    plan refuses with TensorRT 11.3 (tests/test_lora_engines.py)."""
    root = Path(__file__).parents[1]
    importers = sorted(str(p.relative_to(root)) for d in ("engines", "exporter", "koala_trt", "calibration")
                       for p in (root / d).rglob("*.py")
                       if "import tensorrt" in p.read_text() or "from tensorrt" in p.read_text())
    assert importers == ["engines/trt.py"]
    import io
    import tokenize

    src = (root / "engines" / "trt.py").read_text()
    code = "".join(t.string for t in tokenize.generate_tokens(io.StringIO(src).readline)
                   if t.type not in (tokenize.STRING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE,
                                     tokenize.INDENT, tokenize.DEDENT))  # code only, no docstrings
    for banned in ("BuilderFlag.FP16", "BuilderFlag.INT8", "fp16=", "int8=", "calibrator", "refittable="):
        assert banned not in code, banned
    assert "strongly_typed=True" in code and "BuilderFlag.REFIT_IDENTICAL" in code
    assert code.count("BuilderFlag.REFIT)") == 1  # the refit = "weights" branch only
