"""ONNX Runtime sessions: one place that picks providers and turns load errors into one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from koala_core.errors import KoalaError, UsageError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# A provider as InferenceSession takes it: a name, or (name, options).
Provider = str | tuple[str, dict[str, str]]
# The CUDA provider runs FP32 MatMul/Gemm (cuBLAS) and Conv (cuDNN) in TF32 on sm_80+ unless its
# `use_tf32` option is "0" (onnxruntime >= 1.18; the [gpu] extra needs >= 1.20). TF32 keeps 10
# mantissa bits (unit roundoff ~4.9e-4), so a TF32 "reference" cannot tell a TF32 candidate apart.
FP32_CUDA_OPTIONS = {"use_tf32": "0"}
# ONNX Runtime evaluates FP8 (float8e4m3fn) Q/DQ on CPU only at graph optimization level BASIC or
# below: at EXTENDED its fusions (MatMulIntegerToFloat, Transpose optimizations) reject float8
# inputs and the session fails to load. Graphs of these precisions get BASIC.
BASIC_ONLY_PRECISIONS = ("fp8",)


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def default_providers(available: list[str]) -> list[Provider]:
    """The product's order: CUDA first where onnxruntime-gpu offers it, else CPU (TF32 as the CUDA
    provider defaults: speed for running the pipeline, not a reference)."""
    return [p for p in (CUDA, CPU) if p in available]


def fp32_providers(available: list[str] | None = None) -> list[Provider]:
    """Providers for an FP32 *reference* (what a TensorRT engine or a precision variant is compared
    with): the CUDA provider with TF32 off where onnxruntime-gpu offers it, then CPU (IEEE FP32)."""
    available = available_providers() if available is None else available
    cuda: list[Provider] = [(CUDA, dict(FP32_CUDA_OPTIONS))] if CUDA in available else []
    return [*cuda, CPU]


def make_session(path: Path | str, providers: list[Provider] | None = None, threads: int | None = None,
                 optimize: bool = True, precision: str | None = None, in_node_order: bool = False) -> Any:
    """An InferenceSession for `path` on `providers` [default: `default_providers`; for an FP32
    reference pass `fp32_providers()`]. `precision`: the graph's (as its manifest records it); an
    FP8 graph is optimized at BASIC only (BASIC_ONLY_PRECISIONS). `in_node_order`: ONNX Runtime's
    PRIORITY_BASED order (of the nodes ready to run, the first in the graph's list runs first), for
    graphs whose side branches must run as soon as their inputs exist; the default order (a depth-first
    walk back from the outputs) runs a side branch feeding only an output last, keeping its input alive."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("onnxruntime is not installed: pip install 'koala-trt[cpu]' (or [gpu] on a GPU machine)") from None
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"missing ONNX file {path}")
    if providers is None:
        providers = default_providers(list(ort.get_available_providers()))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is None:
        from koala_core.run_settings import default_threads

        threads = default_threads()  # a command's --threads
    if threads:
        opts.intra_op_num_threads = threads
    if in_node_order:
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif precision in BASIC_ONLY_PRECISIONS:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KoalaError(f"ONNX Runtime cannot load {path}: {first[:300]}") from None
