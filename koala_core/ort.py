"""ONNX Runtime sessions: one place that picks providers and turns load errors into one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from koala_core.errors import KoalaError, UsageError


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def make_session(path: Path | str, providers: list[str] | None = None, threads: int | None = None,
                 optimize: bool = True) -> Any:
    """An InferenceSession for `path`: CUDA first where onnxruntime-gpu offers it, else CPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("onnxruntime is not installed: pip install 'koala-trt[cpu]' (or [gpu] on a GPU machine)") from None
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"missing ONNX file {path}")
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KoalaError(f"ONNX Runtime cannot load {path}: {first[:300]}") from None
