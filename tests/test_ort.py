"""koala_core.ort: the product's provider order and the FP32 reference's (TF32 off on CUDA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from koala_core.ort import default_providers, fp32_providers, make_session

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def _matmul_onnx(path: Path) -> tuple[Path, np.ndarray]:
    """y = x @ W, W 8x4 (opset 17, IR 8 so any onnxruntime >= 1.15 loads it)."""
    w = np.arange(32, dtype=np.float32).reshape(8, 4) / 7
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path, w


def test_reference_providers_turn_tf32_off_on_cuda() -> None:
    assert fp32_providers([CUDA, CPU]) == [(CUDA, {"use_tf32": "0"}), CPU]
    assert fp32_providers(["AzureExecutionProvider", CPU]) == [CPU]
    assert fp32_providers([CPU]) == [CPU]
    # each call gets its own options dict: a caller editing one cannot turn TF32 back on for the next
    first = fp32_providers([CUDA, CPU])
    first[0][1]["use_tf32"] = "1"  # type: ignore[index]
    assert fp32_providers([CUDA, CPU])[0] == (CUDA, {"use_tf32": "0"})


def test_product_default_order_is_unchanged() -> None:
    assert default_providers([CPU, CUDA, "AzureExecutionProvider"]) == [CUDA, CPU]
    assert default_providers(["AzureExecutionProvider", CPU]) == [CPU]


def test_reference_session_runs_on_what_it_asked_for(tmp_path: Path) -> None:
    """Whatever this machine offers: where the session runs on the CUDA provider (onnxruntime-gpu
    and a usable GPU) it reports use_tf32 0; otherwise it runs on the CPU provider alone. (That a
    listed CUDA provider is really used is `make test-gpu`'s check, tests/test_trt_gpu.py.)"""
    path, w = _matmul_onnx(tmp_path / "mm.onnx")
    sess = make_session(path, fp32_providers())
    if sess.get_providers()[0] == CUDA:
        assert sess.get_provider_options()[CUDA]["use_tf32"] == "0"
    else:
        assert sess.get_providers() == [CPU]
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
    (y,) = sess.run(["y"], {"x": x})
    # 8-term dot products of values below 5: FP32 rounding is ~1e-6 relative, TF32 (10-bit
    # mantissa) would be ~1e-3, so 1e-5 holds on any CPU and rejects a TF32 result.
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.astype(np.float64), rtol=1e-5, atol=1e-6)
