"""TensorRT on a real GPU (`make test-gpu`): build random:tiny engines for the local card (FP32, and
the FP16 and INT8 strongly typed engines users build from `koala-trt convert` / `quantize` folders)
and compare them with an FP32 ONNX Runtime reference (koala_core.ort.fp32_providers: TF32 off);
run `generate`, `validate --backend tensorrt` and the Triton Python model on the real plans.
Skipped, with the reason, where TensorRT, cuda-python or a GPU is missing (plain `make test`);
`make test-gpu` (--require-gpu) turns those skips into failures."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

SIZE = 256  # random:tiny exports cover 128..512 px
# Small accuracy runs of convert / quantize (as tests/test_precision.py): one held-out prompt, two steps, 128 px.
FAST_ACCURACY = ("--heldout-num", "1", "--accuracy-steps", "2", "--accuracy-size", "128")
# What each variant folder records per component, from docs/precision.md: `convert --precision fp16`
# converts the text encoders and the U-Net (the VAE decoder stays FP32); `quantize` the U-Net only.
VARIANTS = {
    "fp16": {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32"},
    "int8": {"text_encoder": "fp32", "text_encoder_2": "fp32", "unet": "int8", "vae_decoder": "fp32"},
}
# Engine names for the local profile below (batch 1 with guidance, 256 px), written out by hand from
# the naming rule in docs/profiles-and-build.md: text encoders take one or both prompt sets (b1-2-2,
# no spatial part), the U-Net the CFG batch (b2), the VAE the images (b1).
SHAPES = {"text_encoder": "b1-2-2", "text_encoder_2": "b1-2-2", "unet": "b2.256x256", "vae_decoder": "b1.256x256"}


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


def _local_profile(path: Path, device, refit: str = "none", batch: str = "1",  # type: ignore[no-untyped-def]
                   precision: dict[str, str] | None = None) -> Path:
    """A user profile for whatever GPU runs the test (the same schema as the shipped cards)."""
    prec = {"text_encoder": "fp32", "text_encoder_2": "fp32", "unet": "fp32", **(precision or {})}
    path.write_text(f"""
name = "local-test"
description = "{device.name} (test)"
[gpu]
names = ["{device.name}"]
compute_capability = "{device.compute_capability}"
memory_gib = {device.memory_bytes / (1 << 30):.2f}
[precision]
text_encoder = "{prec['text_encoder']}"
text_encoder_2 = "{prec['text_encoder_2']}"
unet = "{prec['unet']}"
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


def _reference(artifacts: Path):  # type: ignore[no-untyped-def]
    """The FP32 reference: ONNX Runtime on the CUDA provider with TF32 off (or the CPU provider), so a
    rel L2 of 1e-3 tells a TF32 engine apart (TF32's unit roundoff is 4.9e-4 per op)."""
    from koala_core.ort import fp32_providers
    from runtime.backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(artifacts, providers=fp32_providers())


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
    assert set(m["engines"]) == set(SHAPES)
    for name, e in m["engines"].items():
        assert e["file"] == f"{name}.fp32.{SHAPES[name]}.sm{device.sm}.trt{trt.version()}.plan"
        assert e["precision"] == "fp32"
        assert (engines_dir / e["file"]).stat().st_size == e["bytes"] > 0
    assert (engines_dir / "timing.cache").is_file() and (engines_dir / "tokenizer").is_dir()


def test_engines_match_onnx_runtime(engines_dir: Path, tiny_artifacts: Path) -> None:
    from runtime.tensorrt_backend import TensorRTBackend

    ort = _reference(tiny_artifacts)
    with TensorRTBackend(engines_dir) as trt_backend:
        for name, spec in trt_backend.specs.items():
            batch = {"unet": 2, "vae_decoder": 1}.get(name, 2)
            feeds = spec.dummy_inputs(batch, SIZE, SIZE, seed=3)
            _compare(ort.run(name, feeds), trt_backend.run(name, feeds), rel_l2=1e-3)  # fp32, TF32 off


def test_reference_is_fp32_on_this_machine(tiny_artifacts: Path) -> None:
    """The reference the engines are held to runs TF32-free: onnxruntime-gpu's CUDA provider with
    use_tf32 0 (as the session reports it), or the CPU provider where there is no CUDA provider."""
    import onnxruntime

    ref = _reference(tiny_artifacts)
    session = ref.session("unet")
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert session.get_providers()[0] == "CUDAExecutionProvider"  # type: ignore[attr-defined]
        assert session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"  # type: ignore[attr-defined]
    else:
        assert session.get_providers() == ["CPUExecutionProvider"]  # type: ignore[attr-defined]


def _poison_outputs(backend, component: str) -> None:  # type: ignore[no-untyped-def]
    """Fill the component's device output buffers with NaN, so a graph replay that writes nothing (or
    only part) cannot pass for a result: whatever comes back was written by this call."""
    from engines import cuda

    session = backend._sessions[component]
    for name in session.engine.outputs:
        buf = session.buffers[name]
        ones = np.full(buf.nbytes, 0xFF, dtype=np.uint8)  # all-ones bits: NaN in float32 and float16 alike
        cuda.copy_htod(buf.ptr, ones, backend.stream)
        cuda.stream_sync(backend.stream)


def test_buffers_persist_inputs_are_not_recopied_and_graphs_replay(engines_dir: Path) -> None:
    from runtime.tensorrt_backend import TensorRTBackend

    with TensorRTBackend(engines_dir, cuda_graphs=True) as b, TensorRTBackend(engines_dir, cuda_graphs=False) as plain:
        spec = b.specs["unet"]
        feeds = spec.dummy_inputs(2, SIZE, SIZE, seed=1)
        first = b.run("unet", feeds)  # runs once, then captures the graph: no launch yet
        assert b.graph_launches == 0
        _compare(plain.run("unet", feeds), first, rel_l2=1e-6)
        uploads = b.uploads

        # identical inputs: nothing uploaded, the graph replays into a poisoned output buffer
        _poison_outputs(b, "unet")
        again = b.run("unet", feeds)
        assert b.uploads == uploads and b.uploads_skipped >= len(spec.inputs) and b.graph_launches == 1
        _compare(first, again, rel_l2=1e-6)

        # new inputs each replay: a new latent (only `sample` uploaded), then every input new; each
        # replay must equal a fresh non-graph run of the same engine on those inputs, and differ from
        # the first result (so a replay that ignored the new inputs fails)
        step = dict(feeds, sample=feeds["sample"] * 0.5)
        other = dict(spec.dummy_inputs(2, SIZE, SIZE, seed=2), time_ids=feeds["time_ids"] + 1)  # time_ids do not follow the seed
        for launches, (new, uploaded) in enumerate(((step, 1), (other, len(spec.inputs))), start=2):
            before = b.uploads
            _poison_outputs(b, "unet")
            got = b.run("unet", new)
            assert b.graph_launches == launches and b.uploads == before + uploaded
            # same plan, same tactics, graph or not: only run-to-run kernel nondeterminism differs,
            # which TensorRT's FP32 kernels do not have beyond ~1e-7 relative
            _compare(plain.run("unet", new), got, rel_l2=1e-6)
            assert not np.allclose(got["out_sample"], first["out_sample"], rtol=1e-3, atol=1e-3)


def test_shape_outside_the_profile_is_a_clear_error(engines_dir: Path) -> None:
    from koala_core.errors import UsageError
    from runtime.tensorrt_backend import TensorRTBackend

    with TensorRTBackend(engines_dir) as b:
        feeds = b.specs["unet"].dummy_inputs(2, 2 * SIZE, SIZE)
        with pytest.raises(UsageError, match=r"unet.sample: shape \(2, 4, 64, 32\) is outside"):
            b.run("unet", feeds)


def test_sequential_residency_runs_one_engine_at_a_time(engines_dir: Path, tiny_artifacts: Path) -> None:
    from runtime.tensorrt_backend import TensorRTBackend

    ort = _reference(tiny_artifacts)
    with TensorRTBackend(engines_dir, residency="sequential") as b:
        for name in ("text_encoder", "unet", "vae_decoder", "unet"):
            feeds = b.specs[name].dummy_inputs(2 if name != "vae_decoder" else 1, SIZE, SIZE, seed=5)
            _compare(ort.run(name, feeds), b.run(name, feeds), rel_l2=1e-3)
            assert list(b._sessions) == [name]


def test_other_tensorrt_version_in_manifest_is_refused(engines_dir: Path, tmp_path: Path) -> None:
    from koala_core.errors import KoalaError
    from runtime.tensorrt_backend import TensorRTBackend

    copy = tmp_path / "copy"
    shutil.copytree(engines_dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["tensorrt"] = "9.0.0"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(KoalaError, match=r"built with TensorRT 9\.0\.0 .* Rebuild them on this machine: koala-trt build"):
        TensorRTBackend(copy)


def test_weight_stripped_refit_identical_engines(device, tiny_artifacts: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from runtime.tensorrt_backend import TensorRTBackend

    out = tmp_path / "stripped"
    code, _, err = run_cli("build", "--onnx", tiny_artifacts, "--profile",
                           _local_profile(tmp_path / "p.toml", device, refit="identical"), "--out", out,
                           "--components", "unet")
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["flags"]["refit"] == "REFIT_IDENTICAL+STRIP_PLAN" and m["engines"]["unet"]["stripped"]
    ort = _reference(tiny_artifacts)
    feeds = ort.specs["unet"].dummy_inputs(2, SIZE, SIZE, seed=7)
    with TensorRTBackend(out) as b:  # refitted from the identical ONNX at load
        _compare(ort.run("unet", feeds), b.run("unet", feeds), rel_l2=1e-3)


def test_weight_streaming_engine_runs_with_its_budget(device, tiny_artifacts: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A streamable U-Net with a budget below its weights (1 MiB of about 9 MiB in FP32): the runtime sets
    the recorded budget before making the context, the rest streams from host memory, and the output is
    the reference's."""
    from runtime.tensorrt_backend import TensorRTBackend

    out = tmp_path / "streaming"
    code, _, err = run_cli("build", "--onnx", tiny_artifacts, "--profile", _local_profile(tmp_path / "p.toml", device),
                           "--out", out, "--components", "unet", "--weight-streaming-budget", "0.0009765625")
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    e = m["engines"]["unet"]
    assert e["weight_streaming"]["budget_bytes"] == 1 << 20 and e["weight_streaming"]["from"] == "profile"
    assert e["builder_flags"].count("WEIGHT_STREAMING") == 1 and e["weight_streaming"]["streamable_weights_bytes"] > 1 << 20
    ort = _reference(tiny_artifacts)
    feeds = ort.specs["unet"].dummy_inputs(2, SIZE, SIZE, seed=9)
    with TensorRTBackend(out) as b:
        _compare(ort.run("unet", feeds), b.run("unet", feeds), rel_l2=1e-3)
        assert b.streaming_budgets == {"unet": 1 << 20}


def test_dynamic_batch_engine(device, tiny_artifacts: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from runtime.tensorrt_backend import TensorRTBackend

    out = tmp_path / "dynamic"
    code, _, err = run_cli("build", "--onnx", tiny_artifacts, "--profile",
                           _local_profile(tmp_path / "p.toml", device, batch="[1, 1, 2]"), "--out", out,
                           "--components", "unet")
    assert code == 0, err
    ort = _reference(tiny_artifacts)
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


# ----- FP16 and INT8: the strongly typed engines users build ------------------------------------------

@pytest.fixture(scope="module", params=sorted(VARIANTS))
def typed(request: pytest.FixtureRequest, device, tiny_artifacts: Path, tiny_calibration: Path,  # type: ignore[no-untyped-def]
          tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(precision, variant folder, engines folder): the folder from `koala-trt convert --precision fp16`
    or `koala-trt quantize` (TensorRT layout) of the random:tiny export, as docs/precision.md makes
    them, and `koala-trt build` of it for a local profile asking for the precisions it records."""
    pytest.importorskip("modelopt.onnx.quantization", reason="NVIDIA ModelOpt's ONNX tools are not installed (pip install 'koala-trt[precision]')")
    precision = request.param
    root = tmp_path_factory.mktemp(f"trt-{precision}")
    folder = root / f"tiny-{precision}"
    make = (("convert", "--onnx", tiny_artifacts, "--precision", "fp16") if precision == "fp16" else
            ("quantize", "--onnx", tiny_artifacts))
    code, _, err = run_cli(*make, "--calib", tiny_calibration, "--out", folder, *FAST_ACCURACY)
    assert code == 0, err
    wanted = {c: p for c, p in VARIANTS[precision].items() if c != "vae_decoder"}
    out = root / "engines"
    code, _, err = run_cli("build", "--onnx", folder, "--profile", _local_profile(root / "p.toml", device, precision=wanted),
                           "--out", out)
    assert code == 0, err
    return precision, folder, out


def test_typed_engines_are_built_from_the_variant_graphs(typed: tuple[str, Path, Path], device) -> None:  # type: ignore[no-untyped-def]
    from engines import trt
    from exporter.manifest import load_manifest

    precision, folder, engines = typed
    m = json.loads((engines / "manifest.json").read_text())
    variant = load_manifest(folder)
    assert set(m["engines"]) == set(SHAPES)
    for name, e in m["engines"].items():
        want = VARIANTS[precision][name]
        assert e["precision"] == want
        assert e["file"] == f"{name}.{want}.{SHAPES[name]}.sm{device.sm}.trt{trt.version()}.plan"
        # built from the converted graph of the variant folder, not from the FP32 export
        assert Path(e["source"]["onnx"]).resolve() == variant.onnx_path(name).resolve()
        assert e["source"]["onnx_sha256"] == variant.data["files"][variant.component(name)["file"]]["sha256"]
        # the graph interface stays FP32/INT32 (keep_io_types), and so does the engine's
        assert e["io_dtypes"] == {t.name: t.dtype for t in (*variant.spec(name).inputs, *variant.spec(name).outputs)}


def test_typed_engines_pass_validate(typed: tuple[str, Path, Path], tmp_path: Path) -> None:
    """`koala-trt validate --backend tensorrt` on the real plans: every component and end to end
    within the gate of the precision the folder records (exporter/tolerances.py)."""
    precision, folder, engines = typed
    report = tmp_path / "r.json"
    code, out, err = run_cli("validate", "--artifacts", folder, "--backend", "tensorrt", "--engines", engines,
                             "--height", SIZE, "--width", SIZE, "--steps", "2", "--random-samples", "1", "--report", report)
    data = json.loads(report.read_text())
    assert code == 0, (err, data.get("failures"))
    assert data["passed"] and data["failures"] == [] and data["backend"] == "tensorrt" and data["end_to_end"]
    assert data["components"] == VARIANTS[precision]
    ids = {c["id"] for c in data["checks"]}
    assert {f"{c}/prompts" for c in SHAPES} | {"end_to_end"} <= ids


def _triton_standin_over_engines(repo: Path, backend):  # type: ignore[no-untyped-def]
    """tests/test_shipping.py's stand-in for `triton_python_backend_utils` (LABELLED TEST DOUBLE: no
    Triton server runs here), whose BLS requests to a `tensorrt_plan` model run that plan on this GPU
    through `backend` (checked to be the plan the repository holds), with Triton's batch reshape."""
    from exporter.manifest import sha256_file
    from shipping.triton_io import from_triton
    from test_shipping import _triton_python_backend_standin

    pb = _triton_python_backend_standin(repo)
    layout = json.loads((repo / "koala" / "1" / "pipeline" / "triton.json").read_text())["models"]
    plans = {v["model"]: c for c, v in layout.items() if v["platform"] == "tensorrt_plan"}
    for model, comp in plans.items():
        assert sha256_file(repo / model / "1" / "model.plan") == backend.manifest.entry(comp)["sha256"]
    onnx_request = pb.InferenceRequest

    class InferenceRequest(onnx_request):  # type: ignore[misc, valid-type]
        def exec(self):  # type: ignore[no-untyped-def]
            comp = plans.get(self.model_name)
            if comp is None:
                return super().exec()
            spec, batched = backend.specs[comp], bool(layout[comp]["batched"])
            feeds = {t.name(): from_triton(spec.input(t.name()), t.as_numpy(), batched) for t in self.inputs}
            outs = backend.run(comp, feeds)
            return pb.InferenceResponse([pb.Tensor(n, outs[n]) for n in self.outputs])

    pb.InferenceRequest = InferenceRequest
    return pb, plans


def _same_image(a: np.ndarray, b: np.ndarray) -> None:
    """The same plans on the same inputs in the same order (one sampler): equal images, up to one grey
    level where a last-bit difference of a kernel (run to run) crosses a rounding boundary of the
    uint8 cast; a different input, step count or component gives differences of many levels."""
    assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape
    assert int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= 1


def test_typed_engines_generate_and_serve_from_triton(typed: tuple[str, Path, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`koala-trt generate --backend tensorrt` on the plans, and the repository's Python model
    (model.py) over the same plans copied into a `koala-trt triton` repository: the same image."""
    import importlib.util
    import sys

    from PIL import Image

    from runtime.tensorrt_backend import TensorRTBackend

    precision, folder, engines = typed
    prompt = "a koala reading a newspaper in a cafe"
    common = ("--backend", "tensorrt", "--engines", engines, "--prompt", prompt, "--seed", "3", "--steps", "4",
              "--height", SIZE, "--width", SIZE, "--no-progress", "--json")
    images = {}
    for how, extra in (("engines only", ()), ("with artifacts", ("--artifacts", folder))):
        png = tmp_path / f"{len(images)}.png"
        code, stdout, err = run_cli("generate", *extra, *common, "--out", png)
        assert code == 0, (how, err)
        assert json.loads(stdout)["images"] == [str(png)]
        images[how] = np.asarray(Image.open(png).convert("RGB"))
        assert images[how].shape == (SIZE, SIZE, 3) and images[how].std() > 1, how
    # tokenizers, scheduler and defaults from the engines folder or from the artifacts: one pipeline
    _same_image(images["engines only"], images["with artifacts"])
    generated = images["with artifacts"]

    repo = tmp_path / "repo"
    code, stdout, err = run_cli("triton", "--artifacts", folder, "--engines", engines, "--out", repo, "--json")
    assert code == 0, err
    models = json.loads(stdout)["models"]
    assert {m: v["platform"] for m, v in models.items() if m != "koala"} == {f"koala_{c}": "tensorrt_plan" for c in SHAPES}
    with TensorRTBackend(engines) as backend:
        pb, plans = _triton_standin_over_engines(repo, backend)
        assert set(plans.values()) == set(SHAPES)
        monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
        spec = importlib.util.spec_from_file_location(f"koala_triton_model_{precision}", repo / "koala" / "1" / "model.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        model = module.TritonPythonModel()
        model.initialize({})
        request = pb.Request(prompt=np.array([prompt.encode()], dtype=object), seed=np.array([3], np.int64),
                             steps=np.array([4], np.int32), height=np.array([SIZE], np.int32), width=np.array([SIZE], np.int32))
        [response] = model.execute([request])
        assert not response.has_error(), response.error().message()
        image = pb.get_output_tensor_by_name(response, "image").as_numpy()
        model.finalize()
    _same_image(image, generated)


def test_triton_batch_limit_fits_the_engines(typed: tuple[str, Path, Path], tmp_path: Path) -> None:
    """Triton's TensorRT backend refuses to load a tensorrt_plan model whose max_batch_size exceeds the
    engine profile's largest batch ("configuration specified max-batch 16 but TensorRT engine only
    supports max-batch 1", triton-inference-server/server#7056), or that batches an engine whose
    batch dim is static (server#1105): the repository must declare what each plan was built for."""
    from engines.engine_manifest import load_engines_manifest

    _, folder, engines = typed
    code, stdout, err = run_cli("triton", "--artifacts", folder, "--engines", engines, "--out", tmp_path / "repo", "--json")
    assert code == 0, err
    models = json.loads(stdout)["models"]
    em = load_engines_manifest(engines)
    for comp in SHAPES:
        lo, _, hi = em.shape_range(comp).batch
        declared = models[f"koala_{comp}"]["max_batch_size"]
        assert (declared == 0) if lo == hi else (0 < declared <= hi), (comp, models[f"koala_{comp}"], (lo, hi))


RTX_GRAPHS_SCRIPT = """
import sys
import numpy as np
from koala_trt.cli import main
from runtime.tensorrt_backend import TensorRTBackend
artifacts, profile, out = sys.argv[1:4]
assert main(["build", "--onnx", artifacts, "--profile", profile, "--library", "tensorrt-rtx", "--out", out, "-c", "unet"]) == 0
with TensorRTBackend(out, cuda_graphs=True) as g, TensorRTBackend(out, cuda_graphs=False) as plain:
    spec = g.specs["unet"]
    for seed in (1, 2, 2, 3):  # a repeated shape and input: the library replays its own graph
        feeds = spec.dummy_inputs(2, %d, %d, seed=seed)
        a, b = g.run("unet", feeds)["out_sample"], plain.run("unet", feeds)["out_sample"]
        assert np.isfinite(a).all()
        rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        assert rel < 1e-5, rel
    assert g.graph_launches == 0, "TensorRT-RTX engines are never captured by hand"
print("ok")
""" % (SIZE, SIZE)


def test_tensorrt_rtx_engines_run_with_the_librarys_own_cuda_graphs(device, tiny_artifacts: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """TensorRT-RTX engines with cuda_graphs on (cuda_graph_strategy WHOLE_GRAPH_CAPTURE) give what the
    same engines give without graphs. In a process of its own: the TensorRT library is one per process."""
    import subprocess
    import sys

    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX is not installed (pip install 'koala-trt[rtx]')")
    profile = _local_profile(tmp_path / "p.toml", device)
    r = subprocess.run([sys.executable, "-c", RTX_GRAPHS_SCRIPT, str(tiny_artifacts), str(profile), str(tmp_path / "rtx")],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=1200)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
