"""The activation-range pass (calibration/ranges.py) on random:tiny's U-Net: cut into passes that
each hold at most a budget of recorded tensors, it gives the same ranges as one pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from calibration.ranges import chunk_names, collect_ranges, tensor_bytes


def _unet(tiny_artifacts: Path) -> tuple[Path, list[str], list[dict]]:
    from exporter.manifest import load_manifest

    m = load_manifest(tiny_artifacts)
    path = m.onnx_path("unet")
    model = onnx.load(str(path), load_external_data=False)
    names = [o for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Softmax") for o in n.output]
    spec = m.spec("unet")
    return path, names, [spec.dummy_inputs(2, 128, 128, seed=s) for s in (1, 2)]


def test_tensor_sizes_follow_the_sample_shapes(tiny_artifacts: Path) -> None:
    path, names, samples = _unet(tiny_artifacts)
    small = tensor_bytes(path, samples[0])
    from exporter.manifest import load_manifest

    big = tensor_bytes(path, load_manifest(tiny_artifacts).spec("unet").dummy_inputs(2, 256, 256, seed=1))
    assert sum(n in small for n in names) > 0.9 * len(names)  # shape inference resolves nearly all of them
    out = next(o.name for o in onnx.load(str(path), load_external_data=False).graph.output)
    assert small[out] == samples[0]["sample"].nbytes  # the U-Net's output has its input's shape
    assert big[out] == 4 * small[out]  # twice the side, four times the bytes


def test_chunks_keep_order_and_budget() -> None:
    sizes = {"a": 4, "b": 4, "c": 10, "d": 1}
    assert chunk_names(["a", "b", "c", "d", "e"], sizes, 8) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert chunk_names(["a", "b", "d"], sizes, 100) == [["a", "b", "d"]]
    assert chunk_names(["a", "b", "c"], {}, 8) == [["a", "b", "c"]]  # no shapes known: one pass, not one per tensor


def test_passes_under_a_budget_give_the_same_ranges(tiny_artifacts: Path) -> None:
    path, names, samples = _unet(tiny_artifacts)
    sizes = tensor_bytes(path, samples[0])
    budget_mb = max(sizes[n] for n in names if n in sizes) * 3 / 2**20
    assert len(chunk_names(names, sizes, int(budget_mb * 2**20))) > 3  # really several passes
    ticks: list[float] = []
    one = collect_ranges(path, names, iter(samples), budget_mb=1e6)
    many = collect_ranges(path, names, iter(samples), budget_mb=budget_mb, progress=ticks.append)
    # The same tensors, equal up to float32 rounding: ONNX Runtime fuses differently around other
    # outputs (seen: relative differences up to 1e-6 on an AMX Xeon). rtol 1e-5 bounds reassociated
    # float32 sums of this tiny graph, not any CPU's kernels: both passes run on the same CPU.
    assert one.lows.keys() == many.lows.keys()
    for n in names:
        assert np.allclose(one.lows[n], many.lows[n], rtol=1e-5, atol=1e-6), n
        assert np.allclose(one.highs[n], many.highs[n], rtol=1e-5, atol=1e-6), n
    assert many.samples == 2 and abs(sum(ticks) - len(samples)) < 1e-9
