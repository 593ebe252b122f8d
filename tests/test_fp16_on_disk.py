"""The FP16 conversion's cheaper path (calibration/autocast_on_disk.py: AutoCast on the weightless
graph, weights converted on disk; ranges from koala-trt's range pass) against ModelOpt AutoCast's own,
on random:tiny: the same graph node for node with the same weight bytes, and the same FP32 islands as
AutoCast's own reference runner on the same calibration samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import run_cli


@pytest.fixture(autouse=True)
def _needs_modelopt() -> None:
    pytest.importorskip("modelopt.onnx.autocast", reason="NVIDIA ModelOpt's ONNX tools are not installed (pip install 'koala-trt[precision]')")


def _external_copy(path: Path, folder: Path) -> Path:
    """The graph at `path` with its weights in a data file, as the full-size exports keep them
    (random:tiny's graphs hold theirs inline; `convert` moves them out the same way)."""
    from calibration.autocast_on_disk import with_external_weights

    got = with_external_weights(path, folder)
    assert got != path and (folder / "inline-weights.data").stat().st_size > 0
    assert with_external_weights(got, folder / "again") == got  # already external: used as it is
    return got


def _nodes(model: onnx.ModelProto) -> list[tuple]:
    return [(n.name, n.op_type, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute]) for n in model.graph.node]


@pytest.mark.parametrize("name", ["text_encoder", "text_encoder_2", "unet"])
def test_weights_on_disk_give_autocasts_own_graph(tiny_artifacts: Path, tmp_path: Path, name: str) -> None:
    """Same ranges, same rule: AutoCast with its weights loaded (as `convert` ran it before) and on
    the weightless graph write the same nodes, the same initializers in the same order, bit for bit."""
    from modelopt.onnx.autocast import convert_to_mixed_precision

    from calibration import fp16
    from calibration.artifacts import quiet_library
    from calibration.autocast_on_disk import save_with_weights
    from exporter.manifest import load_manifest

    src = load_manifest(tiny_artifacts)
    path = _external_copy(src.onnx_path(name), tmp_path / "src")
    absmax = fp16.measure_ranges(path, fp16._range_inputs(src, name, fp16.Fp16Options()))
    keep = list(fp16.KEEP_FP32_OPS)
    with quiet_library():
        whole = convert_to_mixed_precision(str(path), low_precision_type="fp16", keep_io_types=True, data_max=np.inf,
                                           custom_rule=fp16._range_rule(absmax, fp16.DATA_MAX), op_types_to_exclude=keep,
                                           init_max=fp16.INIT_MAX, providers=["cpu"])
        lazy = fp16.autocast(path, absmax, keep, fp16.DATA_MAX)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in lazy.graph.initializer)  # nothing was loaded
    written = save_with_weights(lazy, path.parent, tmp_path / "out" / "model.onnx")
    assert written > 0
    got = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert _nodes(got) == _nodes(whole)
    assert [t.name for t in got.graph.initializer] == [t.name for t in whole.graph.initializer]
    for a, b in zip(got.graph.initializer, whole.graph.initializer):
        assert a.data_type == b.data_type and list(a.dims) == list(b.dims), a.name
        assert numpy_helper.to_array(a).tobytes() == numpy_helper.to_array(b).tobytes(), a.name
    size = {t: sum(numpy_helper.to_array(i).nbytes for i in got.graph.initializer if i.data_type == t)
            for t in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT)}
    assert size[onnx.TensorProto.FLOAT16] > size[onnx.TensorProto.FLOAT]  # most weights converted


def test_fp16_conversion_rounds_as_autocast() -> None:
    """Beyond FP16's range: clipped to +-65504; non-zero below its smallest subnormal: that subnormal
    (AutoCast's rule, sign dropped as it drops it)."""
    from calibration.autocast_on_disk import _fp16

    got = _fp16(np.array([1e6, -1e6, 1e-9, -1e-9, 0.0, 1.5], np.float32))
    tiny = np.finfo(np.float16).smallest_subnormal
    assert got.dtype == np.float16
    assert got.tolist() == [65504.0, -65504.0, float(tiny), float(tiny), 0.0, 1.5]


def test_same_islands_as_autocasts_reference_runner(tiny_artifacts: Path, tiny_calibration: Path, tmp_path: Path) -> None:
    """The islands of the cheaper path (koala-trt's in-graph range pass, the U-Net run per CFG half,
    AutoCast on the weightless graph) are those AutoCast picks with its own reference runner, which
    runs the FP32 graph itself on the same calibration samples (data_max set so that the range rule
    keeps some nodes FP32 on random:tiny, whose activations stay below AutoCast's default 512)."""
    from modelopt.onnx.autocast import convert_to_mixed_precision

    from calibration import fp16
    from calibration.artifacts import quiet_library
    from calibration.autocast_on_disk import save_with_weights
    from calibration.dataset import load_calibration
    from calibration.inputs import unet_samples
    from exporter.manifest import load_manifest

    src = load_manifest(tiny_artifacts)
    path = _external_copy(src.onnx_path("unet"), tmp_path / "src")
    samples = unet_samples(load_calibration(tiny_calibration), src.spec("unet"), 4)
    assert len(samples) == 4 and all(s["sample"].shape[0] == 2 for s in samples)
    absmax = fp16.measure_ranges(path, samples, split_batch=True)
    # A threshold in the widest gap between the measured magnitudes around the 80-95th percentile, so
    # float32 noise between the two runners cannot move a tensor across it.
    v = np.sort(np.array([x for x in absmax.values() if x > 0]))
    lo, hi = int(len(v) * 0.80), int(len(v) * 0.95)
    i = lo + int(np.argmax(v[lo + 1:hi + 1] / v[lo:hi]))
    data_max = float(np.sqrt(v[i] * v[i + 1]))
    assert v[i + 1] / v[i] > 1.001
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    for k, s in enumerate(samples):
        np.savez(feeds / f"{k:03d}.npz", **{n: s[n] for n in names})
    keep = list(fp16.KEEP_FP32_OPS)
    with quiet_library():
        own = convert_to_mixed_precision(str(path), low_precision_type="fp16", keep_io_types=True, data_max=data_max,
                                         calibration_data=str(feeds), op_types_to_exclude=keep, init_max=fp16.INIT_MAX,
                                         providers=["cpu"])
        cheap = fp16.autocast(path, absmax, keep, data_max)
    save_with_weights(cheap, path.parent, tmp_path / "cheap" / "model.onnx")
    cheap = onnx.load(str(tmp_path / "cheap" / "model.onnx"), load_external_data=False)
    ops = {n.name: n.op_type for n in own.graph.node}
    islands = {n for n, p in fp16.compute_precisions(own).items() if p == "fp32"}
    assert islands == {n for n, p in fp16.compute_precisions(cheap).items() if p == "fp32"}
    by_range = {n for n in islands if ops[n] not in keep}  # kept FP32 by the ranges, not by op type
    assert len(by_range) >= 5, by_range


def test_convert_writes_the_graph_and_its_weights_only(tiny_artifacts: Path, tmp_path: Path) -> None:
    """The converted components' folders hold the FP16 graph and its weights file only, and the folder
    verifies (random:tiny's weights are inline: the data file is written only where there are
    external weights)."""
    from exporter.manifest import load_manifest

    out = tmp_path / "fp16"
    code, _, err = run_cli("convert", "--onnx", tiny_artifacts, "--out", out, "--no-accuracy")
    assert code == 0, err
    m = load_manifest(out)
    assert list(m.verify()) == []
    for name in ("text_encoder", "text_encoder_2", "unet"):
        folder = m.onnx_path(name).parent
        assert {f.name for f in folder.iterdir()} <= {"model.onnx", "model.onnx.data"}
        conv = m.component(name)["conversion"]
        assert conv["autocast"]["weights"] == "converted on disk" and conv["fp16_nodes"] > 0
