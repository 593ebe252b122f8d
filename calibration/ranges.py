"""Activation ranges for INT8 calibration, collected in a separate, memory-light phase.

ONNX Runtime's and ModelOpt's calibrators add every intermediate tensor as a graph output and keep
them for all samples before reducing them, which is what took the full KOALA-700M U-Net to 22.5 GiB
(ModelOpt) or out of memory (onnxruntime quantize_static in one call). Here only the tensors that
will be quantized (the activation inputs of the chosen op types) are recorded, and each is reduced
inside the graph, right after the node that makes it, to its min, its max and whether it holds a
NaN, with the graph run in node order: the outputs are three scalars a tensor, and each tensor is
freed as in plain inference, so a pass needs about plain inference's memory however many tensors
are recorded. (Returning the tensors themselves, cut into passes of a few GiB, ran out of 24 GiB
with attention's score tensors at 1024 px; with reductions, 10.5 GiB.)

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
# What each recorded tensor is reduced to inside the graph: its min and max (an infinity shows in
# them), and whether it holds a NaN (which min/max kernels may skip; a sum would overflow on the
# text encoders' causal masks of float32's lowest value).
STATS = ("min", "max", "nan")


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


def _with_statistics(src: Path, names: list[str], tmp: Path) -> tuple[Path, list[list[str]]]:
    """A copy of the graph at `src` that also returns, per tensor of `names`, its min, its max and
    whether it holds a NaN, as float32 scalars (reductions over every axis, placed right after the
    tensor's producer), beside links to its weights. The tensors themselves never leave the graph;
    run in node order (make_session's in_node_order), ONNX Runtime frees each after its last
    consumer as in plain inference. Returns the path and, per name, its three output names."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src), load_external_data=False)
    producer = {o: i for i, node in enumerate(model.graph.node) for o in node.output}
    after: dict[int, list[Any]] = {}  # producer's index (-1: a graph input) -> the reductions of its outputs
    stats: list[list[str]] = []
    f32 = onnx.TensorProto.FLOAT
    for i, n in enumerate(names):
        at = f"koala_range/{i}"
        outs = [f"{at}/{stat}" for stat in STATS]
        after.setdefault(producer.get(n, -1), []).extend([
            helper.make_node("ReduceMin", [n], [f"{at}/min.t"], name=f"{at}/ReduceMin", keepdims=0),
            helper.make_node("Cast", [f"{at}/min.t"], [outs[0]], name=f"{at}/min", to=f32),
            helper.make_node("ReduceMax", [n], [f"{at}/max.t"], name=f"{at}/ReduceMax", keepdims=0),
            helper.make_node("Cast", [f"{at}/max.t"], [outs[1]], name=f"{at}/max", to=f32),
            helper.make_node("IsNaN", [n], [f"{at}/isnan"], name=f"{at}/IsNaN"),  # bytes, not floats, in between
            helper.make_node("Cast", [f"{at}/isnan"], [f"{at}/isnan.u8"], name=f"{at}/isnan.u8", to=onnx.TensorProto.UINT8),
            helper.make_node("ReduceMax", [f"{at}/isnan.u8"], [f"{at}/nan.t"], name=f"{at}/anynan", keepdims=0),
            helper.make_node("Cast", [f"{at}/nan.t"], [outs[2]], name=f"{at}/nan", to=f32)])
        model.graph.output.extend(helper.make_tensor_value_info(o, f32, []) for o in outs)
        stats.append(outs)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(after.get(-1, []))
    for i, node in enumerate(nodes):
        model.graph.node.extend([node, *after.get(i, [])])
    from calibration.artifacts import link_or_copy

    path = tmp / src.name
    for f in src.parent.iterdir():  # external data files, referenced by relative location
        if f.is_file() and f.name != src.name:
            link_or_copy(f, tmp / f.name)
    onnx.save_model(model, str(path))
    return path, stats


def collect_ranges(onnx_path: Path, names: list[str], samples: Iterable[dict[str, np.ndarray]], threads: int | None = None,
                   progress: Callable[[float], None] | None = None, scratch: Path | None = None) -> SampleRanges:
    """Run the graph on every sample and keep each named tensor's min and max per sample. `scratch`:
    where the augmented graph is written (best on the weights' filesystem, so they are hard-linked).

    Memory: each tensor is reduced to scalars inside the graph, right after it is made
    (_with_statistics), so a pass needs about what plain inference of the graph needs, however many
    tensors are recorded (full U-Net at 512 px, 693 tensors: 3.66 GiB against 3.55 GiB for plain
    inference; the same reductions in ONNX Runtime's default order, which keeps every recorded
    tensor alive to the end, 7.2 GiB)."""
    from koala_core.ort import make_session

    if not names:
        raise KoalaError(f"{onnx_path}: no tensors to calibrate")
    lo: dict[str, list[float]] = {n: [] for n in names}
    hi: dict[str, list[float]] = {n: [] for n in names}
    count = 0
    with tempfile.TemporaryDirectory(prefix="koala-ranges-", dir=scratch) as tmp:
        path, stats = _with_statistics(Path(onnx_path), names, Path(tmp))
        session = make_session(path, providers=["CPUExecutionProvider"], threads=threads, in_node_order=True)
        inputs = [i.name for i in session.get_inputs()]
        wanted = [o for outs in stats for o in outs]
        for count, feeds in enumerate(samples, 1):
            values = dict(zip(wanted, session.run(wanted, {k: feeds[k] for k in inputs})))
            for n, (o_min, o_max, o_nan) in zip(names, stats):
                low, high, nan = float(values[o_min]), float(values[o_max]), float(values[o_nan])
                if low == np.inf and high == -np.inf:  # an empty tensor (the reductions' identities): 0, as ever
                    low = high = 0.0
                if nan or not (np.isfinite(low) and np.isfinite(high)):
                    raise KoalaError(f"{onnx_path}: tensor {n} is not finite on calibration sample {count - 1}")
                lo[n].append(low)
                hi[n].append(high)
            if progress:
                progress(1.0)
        del session
    if not count:
        raise KoalaError("no calibration samples")
    return SampleRanges(lo, hi)
