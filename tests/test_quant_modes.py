"""FP8 (E4M3) and weight-only INT8 folders of random:tiny (issue 14): the Q/DQ they hold, their
accuracy.json against FP32 PyTorch, ONNX Runtime's BASIC level for FP8, the planner's byte count,
and their TensorRT-RTX builds (each in a process of its own, as in tests/test_rtx_build.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import run_cli

FAST_ACCURACY = ("--heldout-num", "1", "--accuracy-steps", "2", "--accuracy-size", "128")
SIZE = ("--height", "128", "--width", "128", "--batch", "1", "--no-estimate")
needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="TensorRT-RTX is not installed (make install installs it)")


@pytest.fixture(scope="module")
def quant(tiny_artifacts: Path, tiny_calibration: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    pytest.importorskip("modelopt.onnx.quantization", reason="NVIDIA ModelOpt's ONNX tools are not installed")
    base = tmp_path_factory.mktemp("quant")
    out = {}
    for name, args in {"fp8": ("--precision", "fp8", "--calib", tiny_calibration),
                       "int8-wo": ("--precision", "int8-wo")}.items():
        code, stdout, err = run_cli("quantize", "--onnx", tiny_artifacts, "--out", base / name, *args, *FAST_ACCURACY)
        assert code == 0, err
        out[name] = (base / name, stdout)
    return out


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _check_folder(folder: Path, source: Path, precisions: dict[str, str]) -> None:
    from calibration.artifacts import graph_io_types
    from exporter.manifest import load_manifest

    m = load_manifest(folder)
    assert list(m.verify()) == []
    assert {n: m.precision(n) for n in m.components} == precisions
    for name in m.components:
        onnx.checker.check_model(str(m.onnx_path(name)))
        spec = m.spec(name)
        assert graph_io_types(m.onnx_path(name)) == {t.name: t.dtype for t in (*spec.inputs, *spec.outputs)}
    src = load_manifest(source)
    for name in (n for n, p in precisions.items() if p == "fp32"):  # copied unchanged
        assert m.data["files"][m.component(name)["file"]]["sha256"] == src.data["files"][src.component(name)["file"]]["sha256"]


def _fp32_weights(source: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(source / "unet" / "model.onnx")).graph.initializer}


# ----- FP8 ----------------------------------------------------------------------------------------

def test_fp8_folder(quant: dict, tiny_artifacts: Path, tiny_calibration: Path) -> None:
    from calibration.ranges import SampleRanges

    folder, stdout = quant["fp8"]
    _check_folder(folder, tiny_artifacts, {"text_encoder": "fp32", "text_encoder_2": "fp32", "unet": "fp8", "vae_decoder": "fp32"})
    model = onnx.load(str(folder / "unet" / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19  # FP8 Q/DQ: opset 19+
    inits = {t.name: t for t in model.graph.initializer}
    fp32 = _fp32_weights(tiny_artifacts)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q and all(inits[n.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN for n in [*q, *dq])
    weights = [n for n in dq if n.input[0] in inits]
    assert len(weights) > 20
    for n in weights:  # FP8 weights whose largest value per output channel is the FP32 weight's (scale amax / 448)
        w8 = inits[n.input[0]]
        assert w8.data_type == onnx.TensorProto.FLOAT8E4M3FN
        deq = numpy_helper.to_array(w8).astype(np.float32)
        scale = numpy_helper.to_array(inits[n.input[1]])
        axis = next(a.i for a in n.attribute if a.name == "axis")
        assert scale.ndim == 1 and scale.shape[0] == deq.shape[axis] > 1  # per channel
        deq = deq * scale.reshape([-1 if i == axis else 1 for i in range(deq.ndim)])
        orig = fp32[n.input[0]]  # the FP8 initializer keeps the FP32 weight's name
        red = tuple(i for i in range(deq.ndim) if i != axis)
        np.testing.assert_allclose(np.abs(deq).max(axis=red), np.abs(orig).max(axis=red), rtol=1e-6)
    # Activations: one per-tensor scale each, amax / 448 of the calibration set's cached ranges (mean method)
    cache = next(tiny_calibration.glob("ranges-*.json"))
    ranges = SampleRanges.from_json(json.loads(cache.read_text())).reduce("mean")
    acts = [n for n in q if n.input[0] not in inits]
    assert len(acts) > 20
    for n in acts:
        scale = numpy_helper.to_array(inits[n.input[1]])
        assert scale.ndim == 0
        assert float(scale) == pytest.approx(ranges.amax(n.input[0]) / 448.0, rel=1e-6)
    conv = _manifest(folder)["components"]["unet"]["conversion"]
    assert conv["tool"] == "modelopt.onnx.quantization (fp8)" and "BASIC" in conv["onnxruntime_cpu"]
    report = json.loads((folder / "accuracy.json").read_text())
    assert report["precision"] == "fp8" and report["passed"]
    s = report["components"]["unet"]["outputs"]["out_sample"]
    # FP8 gate (exporter/tolerances.py, rel L2 <= 0.25). Measured 0.097 (AMD EPYC Zen 4, AVX-512 VNNI).
    # ONNX Runtime has no FP8 kernels: it dequantizes and runs FP32 Conv/MatMul, so the error is E4M3's
    # rounding of weights and activations fixed by the graph, the same on AVX2 and AVX-512/AMX CPUs up
    # to FP32 summation order; a wrong scale (amax/36 or amax/127) or a dropped Q/DQ moves it far off.
    assert 0.02 < s["rel_l2"] <= 0.25
    excluded = {e["module"] for e in report["layers"]["excluded"]}
    assert any(m.endswith("conv_in") for m in excluded) and any("time_embedding" in m for m in excluded)
    assert stdout.splitlines()[-1].startswith(f"artifacts: {folder}  (FP8 U-Net, tensorrt layout: "
                                              f"{len(report['layers']['quantized'])} layers quantized, ")


def test_fp8_needs_onnxruntime_basic(quant: dict) -> None:
    """ONNX Runtime refuses FP8 Q/DQ at its default (ALL) level; the session koala-trt makes for an
    fp8 graph runs it at BASIC."""
    from koala_core.errors import KoalaError
    from koala_core.ort import make_session

    path = quant["fp8"][0] / "unet" / "model.onnx"
    with pytest.raises(KoalaError, match="ONNX Runtime cannot load"):
        make_session(path, providers=["CPUExecutionProvider"])
    session = make_session(path, providers=["CPUExecutionProvider"], precision="fp8")
    assert session.get_session_options().graph_optimization_level.name == "ORT_ENABLE_BASIC"


# ----- weight-only INT8 ---------------------------------------------------------------------------

def test_int8_wo_folder(quant: dict, tiny_artifacts: Path) -> None:
    folder, stdout = quant["int8-wo"]
    precisions = {"text_encoder": "int8-wo", "text_encoder_2": "int8-wo", "unet": "int8-wo", "vae_decoder": "fp32"}
    _check_folder(folder, tiny_artifacts, precisions)
    report = json.loads((folder / "accuracy.json").read_text())
    for name in ("text_encoder", "text_encoder_2", "unet"):
        model = onnx.load(str(folder / name / "model.onnx"))
        assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear"]  # activations are not quantized
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
        gemms = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in dq]
        assert len(gemms) == len(report["layers"][name]["quantized"]) > 5
        for node in gemms:
            d = dq[node.input[1]]
            w, scale = inits[d.input[0]], inits[d.input[1]]
            axis = next(a.i for a in d.attribute if a.name == "axis")
            assert w.dtype == np.int8 and np.abs(w).max() == 127  # symmetric, full range in its largest channel
            assert scale.dtype in (np.float16, np.float32) and scale.shape == (w.shape[axis],)  # per output channel
            assert axis == (1 if node.op_type == "MatMul" else 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1)
        assert not [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dq]  # GEMMs only
        fp16 = sum(inits[dq[n.input[1]].input[1]].dtype == np.float16 for n in gemms)
        assert fp16 > len(gemms) / 2  # most GEMMs compute in FP16
    excluded = {e["module"] for e in report["layers"]["unet"]["excluded"]}
    assert any("time_embedding" in m for m in excluded) and not report["layers"]["text_encoder"]["excluded"]
    assert report["precision"] == "int8-wo" and report["passed"]
    # int8-wo gate (rel L2 <= 0.05). Measured (AMD EPYC Zen 4): U-Net 5.3e-3, text encoders 1.1e-2 and
    # 1.5e-2: INT8 weight rounding (per-channel, ~0.4% of a channel's largest weight) plus FP16
    # activations. No integer kernels run (DequantizeLinear, then an FP16/FP32 GEMM), so the figure is
    # the same on AVX2 and AVX-512/AMX CPUs up to summation order; per-tensor or broken scales give >0.1.
    for name in ("text_encoder", "text_encoder_2", "unet"):
        worst = max(o["rel_l2"] for o in report["components"][name]["outputs"].values())
        assert 1e-4 < worst <= 0.05, (name, worst)
    assert "INT8-WO: GEMMs with INT8 weights: text_encoder " in stdout.splitlines()[-1]


def test_planner_counts_int8_wo_gemm_weights_at_one_byte() -> None:
    import torch

    from engines.planner import _weight_bytes

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 16)  # weight 128, bias 16
            self.conv = torch.nn.Conv2d(4, 4, 3)  # weight 144, bias 4
            self.time_embedding = torch.nn.Linear(8, 8)  # excluded: weight 64, bias 8

    net = Net()
    total = 128 + 16 + 144 + 4 + 64 + 8
    assert _weight_bytes(net, "unet", "fp16") == (total, 2 * total)
    assert _weight_bytes(net, "unet", "int8-wo") == (total, 128 + 2 * (total - 128))  # Linear weights only
    assert _weight_bytes(net, "unet", "fp8") == (total, 128 + 144 + 2 * (total - 128 - 144))  # Conv too


# ----- bad inputs beyond the table (tests/test_bad_inputs_convert.py) -------------------------------

@pytest.mark.parametrize("precision", ["fp8", "int8-wo"])
def test_corrupt_calibration_shard(precision: str, tiny_artifacts: Path, tiny_calibration: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib"
    shutil.copytree(tiny_calibration, calib)
    shard = calib / "shard-00001.npz"
    shard.write_bytes(shard.read_bytes()[:-100])
    out = tmp_path / "out"
    code, _, err = run_cli("quantize", "--precision", precision, "--onnx", tiny_artifacts, "--calib", calib, "--out", out)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"Error: calibration shard {shard} is corrupt: its sha256 does not match the "
                                            "calibration manifest (delete it and re-run `koala-trt calibrate` to recapture it)")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# ----- TensorRT-RTX builds on this CPU -------------------------------------------------------------

@needs_rtx
def test_rtx_builds(quant: dict, tmp_path: Path) -> None:
    from tests.test_rtx_build import RTX_VERSION, error_line, koala

    fp8, wo = quant["fp8"][0], quant["int8-wo"][0]
    jobs = {"fp8-rtx4090": ("--profile", "rtx4090", "--onnx", fp8, "--precision", "fp8", "-c", "unet"),
            "wo-rtx3060ti": ("--profile", "rtx3060ti", "--onnx", wo, "--precision", "int8-wo",
                             "-c", "text_encoder,text_encoder_2,unet")}
    for name, args in jobs.items():
        koala("build", *args, *SIZE, "--out", tmp_path / name)
    for name, sm, precision, comps in (("fp8-rtx4090", "sm89", "fp8", {"unet"}),
                                       ("wo-rtx3060ti", "sm86", "int8-wo", {"text_encoder", "text_encoder_2", "unet"})):
        m = _manifest(tmp_path / name)
        assert set(m["engines"]) == comps
        for component, e in m["engines"].items():
            plan = tmp_path / name / e["file"]
            assert e["precision"] == precision and e["file"].startswith(f"{component}.{precision}.b")
            assert e["file"].endswith(f".{sm}.rtx{RTX_VERSION}.plan")
            assert plan.read_bytes()[:4] == b"vtrt" and plan.stat().st_size == e["bytes"]
    refusals = [
        (("--profile", "rtx3060ti", "--onnx", fp8, "--precision", "fp8", "-c", "unet"),
         "Error: fp8 needs sm_89 or newer; rtx3060ti is sm_86"),
        (("--profile", "rtx2080ti", "--onnx", wo, "--precision", "int8-wo", "-c", "unet"),
         "Error: int8-wo needs sm_80 or newer; rtx2080ti is sm_75"),
        (("--profile", "rtx4090", "--onnx", wo, "--precision", "fp8", "-c", "unet"),
         f"Error: profile rtx4090 wants unet in fp8 but no --onnx folder holds it ({wo} holds int8-wo); make one with "
         f"`koala-trt quantize --onnx {wo} --precision fp8 --calib CALIB --out DIR` and pass both folders with --onnx, "
         "or choose the precision with --precision"),
    ]
    for args, line in refusals:
        r = koala("build", *args, *SIZE, "--out", tmp_path / "refused", check=False)
        assert (r.returncode, error_line(r)) == (2, line), r.stderr[-1500:]
        assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused*"))
