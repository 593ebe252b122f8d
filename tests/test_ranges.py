"""The activation-range pass (calibration/ranges.py): each recorded tensor is reduced to scalars inside
the graph, giving the min and max of the whole tensor (checked against the tensors themselves on
random:tiny's U-Net), and a tensor that is not finite anywhere stops the pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from calibration.ranges import _with_statistics, collect_ranges
from koala_core.errors import KoalaError


def _unet(tiny_artifacts: Path) -> tuple[Path, list[str], list[dict]]:
    from exporter.manifest import load_manifest

    m = load_manifest(tiny_artifacts)
    path = m.onnx_path("unet")
    model = onnx.load(str(path), load_external_data=False)
    names = [o for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Softmax") for o in n.output]
    names.append(model.graph.input[0].name)  # a graph input is recorded like any other tensor
    spec = m.spec("unet")
    return path, names, [spec.dummy_inputs(2, 128, 128, seed=s) for s in (1, 2)]


def _whole_tensors(path: Path, names: list[str], samples: list[dict[str, np.ndarray]], tmp: Path) -> list[dict[str, np.ndarray]]:
    """Per sample, the named tensors themselves, returned as graph outputs (the reference the
    reductions must match)."""
    from koala_core.ort import make_session

    model = onnx.load(str(path))
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have)
    onnx.save_model(model, str(tmp / "whole.onnx"), save_as_external_data=True, location="whole.onnx.data")
    sess = make_session(tmp / "whole.onnx", providers=["CPUExecutionProvider"])
    inputs = {i.name for i in sess.get_inputs()}
    return [dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in inputs}))) for feeds in samples]


def test_reductions_give_each_whole_tensors_min_and_max(tiny_artifacts: Path, tmp_path: Path) -> None:
    path, names, samples = _unet(tiny_artifacts)
    assert len(names) > 50
    ticks: list[float] = []
    got = collect_ranges(path, names, iter(samples), progress=ticks.append)
    assert got.samples == 2 and sum(ticks) == len(samples) and list(got.lows) == names
    for i, whole in enumerate(_whole_tensors(path, names, samples, tmp_path)):
        for n in names:
            # Equal up to float32 rounding: ONNX Runtime fuses differently around other consumers or
            # outputs (seen: relative differences up to 1e-6). rtol 1e-5 bounds reassociated float32
            # sums of this tiny graph, not any CPU's kernels: both runs are on the same CPU.
            assert got.lows[n][i] == pytest.approx(float(whole[n].min()), rel=1e-5, abs=1e-6), n
            assert got.highs[n][i] == pytest.approx(float(whole[n].max()), rel=1e-5, abs=1e-6), n
    assert got.highs[names[-1]] == [float(s[names[-1]].max()) for s in samples]  # the input itself: exact


def test_only_scalars_leave_the_graph_right_after_each_tensor(tiny_artifacts: Path, tmp_path: Path) -> None:
    """What bounds the pass's memory: whatever is recorded, the graph returns three scalars a tensor,
    reduced right after the tensor is made (run in node order, ONNX Runtime then frees it as early as
    plain inference does; in its default order the full U-Net at 512 px took 7.2 GiB, not 3.6)."""
    path, names, _ = _unet(tiny_artifacts)
    src = onnx.load(str(path), load_external_data=False)
    aug, stats = _with_statistics(path, names, tmp_path)
    model = onnx.load(str(aug), load_external_data=False)
    extra = model.graph.output[len(src.graph.output):]
    assert len(extra) == 3 * len(names) == sum(len(s) for s in stats)
    assert all(len(o.type.tensor_type.shape.dim) == 0 for o in extra)
    onnx.checker.check_model(model)  # among other things: the nodes are in topological order
    order = [n.name for n in model.graph.node]
    assert [n for n in order if not n.startswith("koala_range/")] == [n.name for n in src.graph.node]
    made = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    for i, n in enumerate(names):
        # the tensor's producer (or, for a graph input, the start), then reductions only, then its own
        first = order.index(f"koala_range/{i}/ReduceMin")
        between = order[made.get(n, -1) + 1:first]
        assert all(b.startswith("koala_range/") for b in between), n


def _log_graph(tmp: Path, dims: tuple[int | str, ...] = (4,)) -> Path:
    """y = log(x): NaN where x < 0, -inf where x == 0."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, list(dims))
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"]), helper.make_node("Relu", ["y"], ["z"])], "g", [x], [z])
    path = tmp / "log" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.mark.parametrize("x", [[1.0, 2.0, -1.0, 3.0], [1.0, 0.0, 2.0, 3.0]], ids=["nan", "inf"])
def test_a_tensor_not_finite_stops_the_pass(tmp_path: Path, x: list[float]) -> None:
    path = _log_graph(tmp_path)
    fine = collect_ranges(path, ["y"], [{"x": np.array([1.0, 2.0, 3.0, 4.0], np.float32)}])
    assert fine.lows["y"] == [0.0] and fine.highs["y"] == pytest.approx([np.log(4.0)])
    top = float(np.finfo(np.float32).max)  # finite, though its sum is not (the text encoders' masks hold the lowest)
    huge = collect_ranges(path, ["x"], [{"x": np.full(4, top, np.float32)}])
    assert huge.lows["x"] == [top] and huge.highs["x"] == [top]
    with pytest.raises(KoalaError, match="tensor y is not finite on calibration sample 1"):
        collect_ranges(path, ["y"], [{"x": np.ones(4, np.float32)}, {"x": np.array(x, np.float32)}])


def test_an_empty_tensor_records_zero(tmp_path: Path) -> None:
    """As the pass did when it returned the tensors: an empty tensor's range is 0..0, not the
    reductions' identities (+inf..-inf), which would read as not finite."""
    path = _log_graph(tmp_path, dims=("n",))
    got = collect_ranges(path, ["x", "y"], [{"x": np.zeros(0, np.float32)}])
    assert got.lows == {"x": [0.0], "y": [0.0]} and got.highs == {"x": [0.0], "y": [0.0]}


def test_no_samples_or_no_tensors_is_an_error(tmp_path: Path) -> None:
    path = _log_graph(tmp_path)
    with pytest.raises(KoalaError, match="no calibration samples"):
        collect_ranges(path, ["y"], [])
    with pytest.raises(KoalaError, match="no tensors to calibrate"):
        collect_ranges(path, [], [{"x": np.ones(4, np.float32)}])
