"""Activation ranges for INT8 calibration, collected in a separate, memory-light phase.

ONNX Runtime's and ModelOpt's calibrators add every intermediate tensor as a graph output and keep
them for all samples before reducing them, which is what took the full KOALA-700M U-Net to 22.5 GiB
(ModelOpt) or out of memory (onnxruntime quantize_static in one call). Here only the tensors that
will be quantized (the activation inputs of the chosen op types) become outputs, and each sample's
outputs are reduced to running min/max at once, so memory is one sample's worth of those tensors,
and at most OUTPUT_BUDGET_MB of them per pass (several passes where a sample's tensors are larger).

Per tensor and sample the min and max are kept, and reduced over the samples by the method:
- "max": min of the minima, max of the maxima (every recorded value representable);
- "mean": the mean of the per-sample minima and maxima, which is the "min-mean" collection of the
  percentile calibrator in NVIDIA's SDXL INT8 recipe at percentile 100. A few outlier samples then
  do not stretch the scale that every other sample is quantized with.
Symmetric INT8 uses amax = max(|min|, |max|) and scale = amax / 127 (TensorRT's convention).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from koala_core.errors import KoalaError

QUANT_OPS = ("Conv", "MatMul", "Gemm")
# The recorded tensors one pass of collect_ranges may hold at once, beside the graph's own working set.
OUTPUT_BUDGET_MB = 6144.0


METHODS = ("max", "mean")


@dataclass
class Ranges:
    """The range of each tensor, reduced over the calibration samples by `method`."""

    lowest: dict[str, float]
    highest: dict[str, float]
    samples: int
    method: str = "max"

    def amax(self, name: str) -> float:
        return max(abs(self.lowest[name]), abs(self.highest[name]))

    def write_trt_cache(self, path: Path) -> None:
        """A TensorRT calibration cache (`name: big-endian float32 scale in hex`), as ModelOpt's
        quantizer imports it (scale = amax / 127)."""
        import struct

        lines = ["TRT-8600-EntropyCalibration2"]
        for n in sorted(self.lowest):
            scale = max(self.amax(n), 1e-12) / 127.0
            lines.append(f"{n}: {struct.pack('!f', scale).hex()}")
        path.write_text("\n".join(lines) + "\n")

    def to_ort(self) -> Any:
        """onnxruntime.quantization's TensorsData (MinMax), for quantize_static's calibration cache."""
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

        return TensorsData(CalibrationMethod.MinMax, {
            n: TensorData(lowest=np.float32(min(self.lowest[n], 0.0)), highest=np.float32(max(self.highest[n], 0.0)))
            for n in self.lowest})


@dataclass
class SampleRanges:
    """Per tensor, the min and max of every calibration sample (what the range pass records)."""

    lows: dict[str, list[float]]
    highs: dict[str, list[float]]

    @property
    def samples(self) -> int:
        return len(next(iter(self.lows.values()))) if self.lows else 0

    def reduce(self, method: str = "max") -> Ranges:
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
        lo_f, hi_f = (np.min, np.max) if method == "max" else (np.mean, np.mean)
        lo = {n: float(lo_f(v)) for n, v in self.lows.items()}
        hi = {n: float(hi_f(v)) for n, v in self.highs.items()}
        return Ranges(lo, hi, self.samples, method)

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "tensors": {n: [self.lows[n], self.highs[n]] for n in sorted(self.lows)}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SampleRanges":
        t = d["tensors"]
        return cls({n: [float(x) for x in v[0]] for n, v in t.items()}, {n: [float(x) for x in v[1]] for n, v in t.items()})


def activation_inputs(model: Any, op_types: Iterable[str] = QUANT_OPS, exclude_nodes: Iterable[str] = ()) -> list[str]:
    """Float activation (non-initializer, non-constant) inputs of the nodes of `op_types`."""
    inits = {t.name for t in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    skip = set(exclude_nodes)
    ops = set(op_types)
    names: list[str] = []
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in ops or node.name in skip:
            continue
        for i, inp in enumerate(node.input):
            if not inp or inp in inits or inp in consts or inp in seen:
                continue
            if node.op_type in ("Conv", "Gemm") and i > 0 and i != 1:
                continue  # a Conv/Gemm bias
            seen.add(inp)
            names.append(inp)
    return names


def _with_outputs(src: Path, names: list[str], tmp: Path) -> Path:
    """A copy of the graph at `src` that also returns `names`, beside a link to its weights."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src), load_external_data=False)
    have = {o.name for o in model.graph.output}
    for n in names:
        if n not in have:
            model.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    from calibration.artifacts import link_or_copy

    path = tmp / src.name
    for f in src.parent.iterdir():  # external data files, referenced by relative location
        if f.is_file() and f.name != src.name:
            link_or_copy(f, tmp / f.name)
    onnx.save_model(model, str(path))
    return path


def tensor_bytes(onnx_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """The size in bytes of every tensor of the graph whose shape ONNX Runtime's symbolic shape
    inference can tell for the shapes of `feeds` (the graph's inputs fixed to them; the weights are
    not read). onnx's own inference stops at the U-Net's computed Reshape shapes."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(onnx_path), load_external_data=False)
    del model.graph.value_info[:]
    for inp in model.graph.input:
        if inp.name in feeds:
            for d, v in zip(inp.type.tensor_type.shape.dim, feeds[inp.name].shape):
                d.Clear()
                d.dim_value = int(v)
    try:
        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - shapes are only an estimate: without them, one pass (chunk_names)
        return {}
    sizes: dict[str, int] = {}
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        t = v.type.tensor_type
        dims = t.shape.dim
        if t.elem_type and dims and all(d.HasField("dim_value") for d in dims):
            sizes[v.name] = int(np.prod([d.dim_value for d in dims])) * onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
    return sizes


def chunk_names(names: list[str], sizes: dict[str, int], budget_bytes: int) -> list[list[str]]:
    """`names` in order, cut into runs whose tensors together stay within `budget_bytes` (a tensor
    of unknown size counts as the largest known one; one larger than the budget is a run of its own).
    With no size known at all (shape inference failed), one run: the single pass of old, rather than
    a pass per tensor."""
    if not sizes:
        return [list(names)]
    default = max(sizes.values())
    chunks: list[list[str]] = [[]]
    used = 0
    for n in names:
        b = sizes.get(n, default)
        if chunks[-1] and used + b > budget_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(n)
        used += b
    return chunks


def collect_ranges(onnx_path: Path, names: list[str], samples: Iterable[dict[str, np.ndarray]], threads: int | None = None,
                   progress: Callable[[float], None] | None = None, scratch: Path | None = None,
                   budget_mb: float = OUTPUT_BUDGET_MB) -> SampleRanges:
    """Run the graph on every sample and keep each named tensor's min and max per sample. `scratch`:
    where the augmented graphs are written (best on the weights' filesystem, so they are hard-linked).

    Memory: ONNX Runtime holds every requested tensor of a run until it returns, so the names are cut
    into runs of at most `budget_mb` for the samples' shapes (chunk_names), each its own pass over
    the samples: more passes, a bounded peak (the full U-Net at 1024 px would hold tens of GiB)."""
    from koala_core.ort import make_session

    if not names:
        raise KoalaError(f"{onnx_path}: no tensors to calibrate")
    feeds_list = list(samples)
    if not feeds_list:
        raise KoalaError("no calibration samples")
    lo: dict[str, list[float]] = {n: [] for n in names}
    hi: dict[str, list[float]] = {n: [] for n in names}
    chunks = chunk_names(names, tensor_bytes(Path(onnx_path), feeds_list[0]), int(budget_mb * 2**20))
    for chunk in chunks:
        with tempfile.TemporaryDirectory(prefix="koala-ranges-", dir=scratch) as tmp:
            session = make_session(_with_outputs(Path(onnx_path), chunk, Path(tmp)), providers=["CPUExecutionProvider"], threads=threads)
            inputs = [i.name for i in session.get_inputs()]
            for count, feeds in enumerate(feeds_list):
                outs = session.run(chunk, {k: feeds[k] for k in inputs})
                for n, a in zip(chunk, outs):
                    lo[n].append(float(a.min()) if a.size else 0.0)
                    hi[n].append(float(a.max()) if a.size else 0.0)
                    if not np.isfinite(a).all():
                        raise KoalaError(f"{onnx_path}: tensor {n} is not finite on calibration sample {count}")
                del outs
                if progress:
                    progress(1 / len(chunks))
            del session
    return SampleRanges(lo, hi)
