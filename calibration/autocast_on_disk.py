"""ModelOpt AutoCast on a graph whose weights stay on disk: the graph rewrite runs on the weightless
graph, and the weights are then converted one tensor at a time, from the source's external data
file to the new one.

Why: `convert_to_mixed_precision` loads every weight into the graph before it rewrites it, and the
rewrite then copies the model (PrecisionConverter's deepcopy) and runs ONNX shape inference four
times and the checker twice; for a graph over 2 GB each of those saves the whole model to a temporary
folder and loads it back (modelopt.onnx.utils.infer_shapes / check_model). On the full KOALA-700M
U-Net that was 248 s and 16.5 GiB of the 435 s and 17.3 GB of `convert` (docs/precision.md). None
of it needs the weights' values: the classification needs only each initializer's largest
magnitude (init_max), and the rewrite only their names, shapes and types.

So here AutoCast's own function runs with four changes, all inside `weights_on_disk()`:
- the graph is never given its external data (`load_external_data_for_model` does nothing), so each
  shape inference and check handles a few MB;
- an external initializer AutoCast converts is not read: the converted TensorProto keeps the
  source's external-data record and notes the source type (`koala_from`);
- the initializer rule (init_max) is not AutoCast's InitializerRangeRule, which reads each tensor,
  but the same test on the largest magnitudes measured beforehand, streamed from the data file
  (`initializer_absmax`), folded into the custom node rule;
- its removal of nodes without consumers gathers the consumed tensors once instead of scanning the
  graph for each tensor (quadratic: 33 of its 48 s on random:tiny's U-Net).
Then `save_with_weights` writes the graph and, tensor by tensor, its external data: each noted
tensor converted exactly as AutoCast's `_convert_initializer_data` converts it (magnitudes beyond
FP16's largest clipped, non-zero values below its smallest subnormal replaced by it), the others
copied. At most one tensor is in memory at a time.

tests/test_precision.py checks the result is AutoCast's own conversion (with its weights loaded):
the same graph, node for node, and the same initializer bytes, on random:tiny.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from koala_core.errors import KoalaError

SOURCE_TYPE = "koala_from"  # external_data key: the element type of the source tensor, when converted


def _is_external(t: Any) -> bool:
    import onnx

    return t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL


def _external(t: Any) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _read(base: Path, t: Any, dtype: Any) -> np.ndarray:
    """The tensor `t`'s values from its external data file under `base`, as `dtype` (a memory map)."""
    ext = _external(t)
    path = base / ext["location"]
    offset = int(ext.get("offset", 0))
    count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    if count == 0:
        return np.zeros(tuple(t.dims), dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)).reshape(tuple(t.dims))


def with_external_weights(path: Path, folder: Path, threshold: int = 1024) -> Path:
    """The graph at `path` with every weight of `threshold` bytes or more in an external data file:
    `path` itself when it already is so (full-size exports over 2 GB), else a copy in `folder` (the
    inline weights written to one data file, the existing data files linked), so that AutoCast's
    passes over the graph never carry the weights (the full text encoder's 470 MB)."""
    import onnx
    from onnx import external_data_helper

    from calibration.artifacts import link_or_copy

    model = onnx.load(str(path), load_external_data=False)
    if not any(not _is_external(t) and len(t.raw_data) >= threshold for t in model.graph.initializer):
        return Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for f in Path(path).parent.iterdir():
        if f.is_file() and f.name != Path(path).name:
            link_or_copy(f, folder / f.name)
    external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True, location="inline-weights.data",
                                                        size_threshold=threshold, convert_attribute=False)
    out = folder / Path(path).name
    onnx.save_model(model, str(out))
    return out


def initializer_absmax(model: Any, base: Path, chunk: int = 1 << 24) -> dict[str, float]:
    """name -> largest magnitude of every float32 initializer (external ones streamed from disk in
    chunks, inline ones from the graph)."""
    import onnx
    from onnx import numpy_helper

    out: dict[str, float] = {}
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT:
            continue
        a = _read(base, t, np.float32).reshape(-1) if _is_external(t) else numpy_helper.to_array(t).reshape(-1)
        m = 0.0
        for i in range(0, a.size, chunk):
            m = max(m, float(np.abs(a[i:i + chunk]).max()))
        out[t.name] = m
    return out


def init_max_rule(absmax: dict[str, float], init_max: float) -> Any:
    """AutoCast's InitializerRangeRule on measured magnitudes: keep a node in FP32 when one of its
    float32 initializers holds a value beyond `init_max` in magnitude."""
    return lambda node: any(absmax.get(i, 0.0) > init_max for i in node.input if i)


def _fp16(values: np.ndarray) -> np.ndarray:
    """AutoCast's `_convert_initializer_data` to FP16, on one tensor."""
    hi, tiny = np.finfo(np.float16).max, np.finfo(np.float16).smallest_subnormal
    a = np.asarray(values, np.float32)
    if np.any(np.abs(a) > hi):
        a = np.clip(a, -1 * hi, hi)
    if np.any((a != 0.0) & (np.abs(a) < tiny)):
        a = np.where((a != 0.0) & (np.abs(a) < tiny), tiny, a)
    return a.astype(np.float16)


@contextlib.contextmanager
def weights_on_disk(base: Path) -> Iterator[None]:
    """While inside, ModelOpt AutoCast converts graphs loaded without their external data, leaving
    the external initializers where they are (see the module's docstring). `base`: the folder of the
    source graph; the working directory while inside, as onnx's checker looks for an in-memory
    graph's external data files there."""
    import onnx
    from modelopt.onnx.autocast import convert as ac_convert
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    helper = ac_convert.onnx.external_data_helper
    if not all(hasattr(PrecisionConverter, a) for a in ("_convert_initializer_data", "_cleanup_no_consumer_nodes")) \
            or not hasattr(helper, "load_external_data_for_model"):
        raise KoalaError("this ModelOpt version converts initializers differently; koala-trt's FP16 path needs "
                         "nvidia-modelopt as pinned in constraints.txt")
    original_convert = PrecisionConverter._convert_initializer_data
    original_load = helper.load_external_data_for_model

    def convert_lazily(self: Any, init: Any, from_type: Any, to_type: Any) -> Any:
        if not _is_external(init):
            return original_convert(self, init, from_type, to_type)
        if to_type.onnx_type != onnx.TensorProto.FLOAT16 or init.data_type != onnx.TensorProto.FLOAT:
            raise KoalaError(f"{init.name}: only float32 -> float16 weights are converted on disk "
                             f"(asked {init.data_type} -> {to_type.onnx_type})")
        new = onnx.TensorProto()
        new.name, new.data_type, new.data_location = init.name, to_type.onnx_type, onnx.TensorProto.EXTERNAL
        new.dims.extend(init.dims)
        for e in init.external_data:
            if e.key != "length":  # the source's byte count, not this type's (the checker would compare them)
                new.external_data.add(key=e.key, value=e.value)
        new.external_data.add(key=SOURCE_TYPE, value=str(init.data_type))
        return new

    def cleanup_no_consumer_nodes(self: Any) -> None:
        """AutoCast's `_cleanup_no_consumer_nodes` with the consumed tensors gathered once: it asks
        `get_consumer_nodes` (a scan of every node) for every output of every node, which on the full
        U-Net's graph with its casts is ~10^7 protobuf reads. Same nodes removed, as it decides all
        of them before removing any."""
        graph = self.model.graph
        keep = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        for node in [n for n in graph.node if not any(o in keep for o in n.output)]:
            graph.node.remove(node)

    original_cleanup = PrecisionConverter._cleanup_no_consumer_nodes
    PrecisionConverter._convert_initializer_data = convert_lazily
    PrecisionConverter._cleanup_no_consumer_nodes = cleanup_no_consumer_nodes
    helper.load_external_data_for_model = lambda model, base_dir: None
    cwd = os.getcwd()
    try:
        os.chdir(base)
        yield
    finally:
        os.chdir(cwd)
        PrecisionConverter._convert_initializer_data = original_convert
        PrecisionConverter._cleanup_no_consumer_nodes = original_cleanup
        helper.load_external_data_for_model = original_load


def save_with_weights(model: Any, source_dir: Path, out_path: Path, data_name: str | None = None) -> int:
    """Write `model` (external initializers referring to files under `source_dir`) to `out_path`,
    its external tensors streamed into `out_path.name + ".data"` one at a time (converted where
    noted, copied otherwise). Returns the bytes of weights written."""
    import onnx

    data_name = data_name or out_path.name + ".data"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(out_path.parent / data_name, "wb") as f:
        for t in model.graph.initializer:
            if not _is_external(t):
                continue
            ext = _external(t)
            src_type = int(ext.pop(SOURCE_TYPE, t.data_type))
            values = _read(Path(source_dir), t, onnx.helper.tensor_dtype_to_np_dtype(src_type))
            if src_type != t.data_type:
                values = _fp16(values)
            pad = (-f.tell()) % 64  # aligned as onnx's writer aligns them
            f.write(b"\0" * pad)
            offset = f.tell()
            buf = np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
            f.write(buf)
            written += len(buf)
            del t.external_data[:]
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(buf)))):
                t.external_data.add(key=k, value=v)
            del values, buf
        f.flush()
        os.fsync(f.fileno())
    if not written:
        (out_path.parent / data_name).unlink()
    onnx.save_model(model, str(out_path))
    return written
