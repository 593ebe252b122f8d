"""TensorRT on a real GPU (`make test-gpu`): build random:tiny engines for the local card and compare
them with ONNX Runtime. Skipped, with the reason, where TensorRT, cuda-python or a GPU is missing."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

SIZE = 256  # random:tiny exports cover 128..512 px


def _why_not() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'koala-trt[gpu]' on a GPU machine)"
    if importlib.util.find_spec("polygraphy") is None:
        return "Polygraphy is not installed"
    from engines import cuda

    if not cuda.available():
        return "cuda-python is not installed"
    if cuda.device_count() == 0:
        return "no NVIDIA GPU visible to CUDA"
    return None


_REASON = _why_not()
# Skip before any fixture runs (the session's random:tiny export would otherwise run first).
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture(scope="module")
def device():  # type: ignore[no-untyped-def]
    from engines import cuda

    return cuda.device_info()


def _local_profile(path: Path, device, refit: str = "none", batch: str = "1") -> Path:  # type: ignore[no-untyped-def]
    """A user profile for whatever GPU runs the test (the same schema as the shipped cards)."""
    path.write_text(f"""
name = "local-test"
description = "{device.name} (test)"
[gpu]
names = ["{device.name}"]
compute_capability = "{device.compute_capability}"
memory_gib = {device.memory_bytes / (1 << 30):.2f}
[precision]
text_encoder = "fp32"
text_encoder_2 = "fp32"
unet = "fp32"
[shapes]
batch = {batch}
height = {SIZE}
width = {SIZE}
[build]
workspace_gib = 1
refit = "{refit}"
[runtime]
cuda_graphs = true
""")
    return path


@pytest.fixture(scope="module")
def engines_dir(device, tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("trt")
    out = root / "engines"
    code, stdout, err = run_cli("build", "--onnx", tiny_artifacts, "--profile", _local_profile(root / "p.toml", device),
                                "--out", out, "--json")
    assert code == 0, err
    return out


def _compare(ref: dict, got: dict, rel_l2: float) -> None:
    from exporter.metrics import error_stats

    assert set(ref) == set(got)
    for name in ref:
        s = error_stats(ref[name], got[name])
        assert s.nonfinite == 0 and s.rel_l2 < rel_l2, (name, s)


def test_manifest_names_and_records(engines_dir: Path, device) -> None:  # type: ignore[no-untyped-def]
    from engines import trt

    m = json.loads((engines_dir / "manifest.json").read_text())
    assert m["gpu"]["name"] == device.name and m["gpu"]["compute_capability"] == device.compute_capability
    assert m["tensorrt"] == trt.version() and m["cuda"]["runtime"]
    for name, e in m["engines"].items():
        assert e["file"] == f"{name}.fp32." + e["file"].split(".fp32.")[1]
        assert f".sm{device.sm}.trt{trt.version()}.plan" in e["file"]
        assert (engines_dir / e["file"]).stat().st_size == e["bytes"] > 0
    assert (engines_dir / "timing.cache").is_file() and (engines_dir / "tokenizer").is_dir()


def test_engines_match_onnx_runtime(engines_dir: Path, tiny_artifacts: Path) -> None:
    from engines.runtime import OnnxRuntimeBackend
    from engines.runtime_trt import TensorRTBackend

    ort = OnnxRuntimeBackend(tiny_artifacts)
    with TensorRTBackend(engines_dir) as trt_backend:
        for name, spec in trt_backend.specs.items():
            batch = {"unet": 2, "vae_decoder": 1}.get(name, 2)
            feeds = spec.dummy_inputs(batch, SIZE, SIZE, seed=3)
            _compare(ort.run(name, feeds), trt_backend.run(name, feeds), rel_l2=1e-3)  # fp32, TF32 off


def test_buffers_persist_inputs_are_not_recopied_and_graphs_replay(engines_dir: Path) -> None:
    from engines.runtime_trt import TensorRTBackend

    with TensorRTBackend(engines_dir, cuda_graphs=True) as b:
        spec = b.specs["unet"]
        feeds = spec.dummy_inputs(2, SIZE, SIZE, seed=1)
        first = b.run("unet", feeds)
        uploads = b.uploads
        again = b.run("unet", feeds)  # identical inputs: nothing uploaded, the captured graph replays
        assert b.uploads == uploads and b.uploads_skipped >= len(spec.inputs) and b.graph_launches == 1
        np.testing.assert_array_equal(first["out_sample"], again["out_sample"])
        step = dict(feeds, sample=feeds["sample"] * 0.5)  # a new latent: only `sample` is uploaded
        b.run("unet", step)
        assert b.uploads == uploads + 1
    with TensorRTBackend(engines_dir, cuda_graphs=False) as plain:
        _compare(first, plain.run("unet", feeds), rel_l2=1e-6)


def test_shape_outside_the_profile_is_a_clear_error(engines_dir: Path) -> None:
    from engines.runtime_trt import TensorRTBackend
    from koala_core.errors import UsageError

    with TensorRTBackend(engines_dir) as b:
        feeds = b.specs["unet"].dummy_inputs(2, 2 * SIZE, SIZE)
        with pytest.raises(UsageError, match=r"unet.sample: shape \(2, 4, 64, 32\) is outside"):
            b.run("unet", feeds)


def test_sequential_residency_runs_one_engine_at_a_time(engines_dir: Path, tiny_artifacts: Path) -> None:
    from engines.runtime import OnnxRuntimeBackend
    from engines.runtime_trt import TensorRTBackend

    ort = OnnxRuntimeBackend(tiny_artifacts)
    with TensorRTBackend(engines_dir, residency="sequential") as b:
        for name in ("text_encoder", "unet", "vae_decoder", "unet"):
            feeds = b.specs[name].dummy_inputs(2 if name != "vae_decoder" else 1, SIZE, SIZE, seed=5)
            _compare(ort.run(name, feeds), b.run(name, feeds), rel_l2=1e-3)
            assert list(b._sessions) == [name]


def test_other_tensorrt_version_in_manifest_is_refused(engines_dir: Path, tmp_path: Path) -> None:
    from engines.runtime_trt import TensorRTBackend
    from koala_core.errors import KoalaError

    copy = tmp_path / "copy"
    shutil.copytree(engines_dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["tensorrt"] = "9.0.0"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(KoalaError, match=r"built with TensorRT 9\.0\.0 .* Rebuild them on this machine: koala-trt build"):
        TensorRTBackend(copy)


def test_weight_stripped_refit_identical_engines(device, tiny_artifacts: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from engines.runtime import OnnxRuntimeBackend
    from engines.runtime_trt import TensorRTBackend

    out = tmp_path / "stripped"
    code, _, err = run_cli("build", "--onnx", tiny_artifacts, "--profile",
                           _local_profile(tmp_path / "p.toml", device, refit="identical"), "--out", out,
                           "--components", "unet")
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["flags"]["refit"] == "REFIT_IDENTICAL+STRIP_PLAN" and m["engines"]["unet"]["stripped"]
    ort = OnnxRuntimeBackend(tiny_artifacts)
    feeds = ort.specs["unet"].dummy_inputs(2, SIZE, SIZE, seed=7)
    with TensorRTBackend(out) as b:  # refitted from the identical ONNX at load
        _compare(ort.run("unet", feeds), b.run("unet", feeds), rel_l2=1e-3)


def test_dynamic_batch_engine(device, tiny_artifacts: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from engines.runtime import OnnxRuntimeBackend
    from engines.runtime_trt import TensorRTBackend

    out = tmp_path / "dynamic"
    code, _, err = run_cli("build", "--onnx", tiny_artifacts, "--profile",
                           _local_profile(tmp_path / "p.toml", device, batch="[1, 1, 2]"), "--out", out,
                           "--components", "unet")
    assert code == 0, err
    ort = OnnxRuntimeBackend(tiny_artifacts)
    with TensorRTBackend(out) as b:
        for batch in (2, 4, 2):  # grows the buffers once, then reuses them
            feeds = b.specs["unet"].dummy_inputs(batch, SIZE, SIZE, seed=batch)
            _compare(ort.run("unet", feeds), b.run("unet", feeds), rel_l2=1e-3)


def test_bench_on_tensorrt(engines_dir: Path) -> None:
    """`koala-trt bench --backend tensorrt`: every component and end to end, device memory reported."""
    code, stdout, err = run_cli("bench", "--backend", "tensorrt", "--engines", engines_dir, "--height", SIZE, "--width", SIZE,
                                "--steps", "2", "--warmup", "1", "--runs", "2", "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["backend"] == "tensorrt" and data["memory"]["kind"] == "device" and data["memory"]["peak_mb"] > 0
    assert set(data["components"]) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    assert data["components"]["unet"]["median"] > 0 and data["end_to_end"]["runs"] == 2
