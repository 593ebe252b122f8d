"""Real TensorRT-RTX engines of random:tiny, built on this CPU-only machine (no GPU, no cuda-python).

Each build runs `koala-trt build` in a process of its own: Polygraphy picks its TensorRT library once
per process, and `make test-gpu` runs standard TensorRT in the pytest process. The engines are built
once per session at 128x128 (the export's smallest size) to keep the added time small. Running them
needs an RTX GPU: see test_rtx_engines_run_on_the_card (gpu-marked).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("tensorrt_rtx") is None,
    reason="TensorRT-RTX is not installed (make install installs it)")

RTX_VERSION = metadata.version("tensorrt-rtx-cu12")  # read here, independently of the code
SIZE = ("--height", "128", "--width", "128")
PIPELINE = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")


def koala(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    """`koala-trt ARGS` in a fresh process (the TensorRT library is chosen once per process)."""
    code = "import sys; from koala_trt.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "POLYGRAPHY_USE_TENSORRT_RTX": ""})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def error_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[-1] if lines else ""


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def folders(tiny_artifacts: Path, tiny_fp16_gemm: Path, tiny_calibration: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The FP32 export, an FP16 folder whose VAE decoder has FP16 GEMMs only (for Turing), and an INT8 U-Net."""
    fp16, int8 = tiny_fp16_gemm, tmp_path_factory.mktemp("rtx-src") / "int8"
    code, _, err = run_cli("quantize", "--onnx", tiny_artifacts, "--calib", tiny_calibration, "--out", int8,
                           "--no-accuracy", "--samples", "2")
    assert code == 0, err
    return {"fp32": tiny_artifacts, "fp16": fp16, "int8": int8}


@pytest.fixture(scope="module")
def built(folders: dict[str, Path], tiny_rtx_set: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every engines folder the done-when of the TensorRT-RTX issue names, built once: rtx3060ti, rtx4090 and
    rtx2080ti are the card folders of the session's engine set (tiny_rtx_set: the same sources and options,
    each card built by `koala-trt build --profile <card>`)."""
    out = tmp_path_factory.mktemp("rtx-engines")
    src = ("--onnx", folders["fp32"], "--onnx", folders["fp16"])
    jobs = {
        "unet-fp32": ("--profile", "rtx4090", "--onnx", folders["fp32"], "--precision", "fp32", "-c", "unet"),
        "unet-int8": ("--profile", "rtx3060ti", "--onnx", folders["int8"], "--precision", "int8", "-c", "unet"),
        "portable": ("--profile", "rtx-portable", *src, "-c", "unet"),
    }
    for name, args in jobs.items():
        koala("build", *args, *SIZE, "--batch", "1", "--no-estimate", "--out", out / name)
    return {**{card: tiny_rtx_set / card for card in ("rtx3060ti", "rtx4090", "rtx2080ti")},
            **{name: out / name for name in jobs}}


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize("name, targets, precisions", [
    ("rtx3060ti", ["8.6"], {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32"}),
    ("rtx4090", ["8.9"], {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32"}),
    ("rtx2080ti", ["7.5"], {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp16"}),
    ("unet-fp32", ["8.9"], {"unet": "fp32"}),
    ("unet-int8", ["8.6"], {"unet": "int8"}),
    ("portable", ["8.6", "8.9", "12.0"], {"unet": "fp16"}),
])
def test_engines_built_without_a_gpu(built: dict[str, Path], name: str, targets: list[str],
                                     precisions: dict[str, str]) -> None:
    folder = built[name]
    m = manifest(folder)
    assert m["format"] == "koala-trt/engines" and m["format_version"] == 2
    assert m["library"] == {"name": "tensorrt-rtx", "version": RTX_VERSION}
    assert m["targets"]["compute_capabilities"] == targets
    assert m["build_host"]["gpu"] is None and m["build_host"]["cuda"] is None  # built on this CPU
    assert m["flags"]["timing_cache"] is None and set(m["flags"]["not_applicable"]) == {"timing_cache",
                                                                                         "hardware_compatibility"}
    assert {c: e["precision"] for c, e in m["engines"].items()} == precisions
    sm = "sm" + "-".join(t.replace(".", "") for t in targets)
    for component, e in m["engines"].items():
        plan = folder / e["file"]
        assert e["file"].startswith(f"{component}.{precisions[component]}.b")
        assert e["file"].endswith(f".{sm}.rtx{RTX_VERSION}.plan")
        assert plan.stat().st_size == e["bytes"] and sha256(plan) == e["sha256"]
        assert plan.read_bytes()[:4] == b"vtrt"  # a serialized TensorRT-RTX plan, not a placeholder
        # the builder's own memory report: weights at least a tenth of the ONNX weights (INT8 and FP16
        # shrink them), never more than the plan; activations present
        assert 0.1 * e["source"]["onnx_bytes"] / (4 if e["precision"] == "int8" else 1) < e["weights_bytes"] < e["bytes"]
        assert e["device_memory_bytes"] > 0
        if component == "unet":  # the prompt's dynamic sequence axis: the export's 1..3 chunks of 77 tokens
            ehs = e["inputs"]["encoder_hidden_states"]
            assert (ehs["min"][1], ehs["opt"][1], ehs["max"][1]) == (77, 77, 231) and not e["static"]
            assert e["shape_range"]["prompt_chunks"] == [1, 1, 3]
    assert sorted(p.name for p in folder.glob("*.plan")) == sorted(e["file"] for e in m["engines"].values())
    note = [n for n in m["notes"] if "INT8" in n]
    assert bool(note) == (name == "unet-int8")


def test_a_second_target_costs_little(built: dict[str, Path]) -> None:
    """An engine for three compute capabilities is well under three single-target engines."""
    one = manifest(built["rtx3060ti"])["engines"]["unet"]["bytes"]
    three = manifest(built["portable"])["engines"]["unet"]["bytes"]
    assert one < three < 2 * one


def test_build_prints_the_engine_table(folders: dict[str, Path], tmp_path: Path) -> None:
    r = koala("build", "--profile", "rtx4090", "--onnx", folders["fp32"], "--onnx", folders["fp16"], *SIZE,
              "--batch", "1", "--no-estimate", "-c", "text_encoder", "--out", tmp_path / "e")
    header = next(line for line in r.stdout.splitlines() if line.startswith("file "))
    assert header.split() == ["file", "MiB", "precision", "targets", "weights", "MiB", "activations", "MiB", "build", "s"]
    row = next(line for line in r.stdout.splitlines() if line.startswith("text_encoder."))
    assert row.split()[2:4] == ["fp16", "sm89"]
    assert r.stdout.strip().splitlines()[-1].startswith(f"engines: {tmp_path / 'e'} (tensorrt-rtx {RTX_VERSION}, "
                                                       "built on a CPU without a GPU (")


def test_dry_run_names_the_library(folders: dict[str, Path], tmp_path: Path) -> None:
    code, out, err = run_cli("build", "--profile", "rtx-portable", "--onnx", folders["fp32"], "--onnx", folders["fp16"],
                             *SIZE, "--dry-run", "--no-estimate", "--out", tmp_path / "e")
    assert code == 0, err
    assert out.splitlines()[0] == (f"build plan (dry run: nothing built, TensorRT not imported) for rtx-portable "
                                   f"(sm_86, sm_89, sm_120, tensorrt-rtx {RTX_VERSION}, no GPU needed) -> {tmp_path / 'e'}")
    assert "unet.fp16.b2.128x128.sm86-89-120.rtx" in out and "timing cache not applicable" in out


def test_weight_streaming_engine(folders: dict[str, Path], built: dict[str, Path], tmp_path: Path) -> None:
    """`build --weight-streaming`: a streamable U-Net (WEIGHT_STREAMING on the builder's config, read back
    from it), its budget from the memory plan in the manifest, and a plan that is the plain build's but
    for its streaming flag. Nothing is deserialized (that needs a GPU)."""
    from engines.engine_manifest import load_engines_manifest

    out = tmp_path / "ws"
    koala("build", "--profile", "rtx3060ti", "--onnx", folders["fp32"], "--onnx", folders["fp16"], "-c", "unet", *SIZE,
          "--batch", "1", "--weight-streaming", "--out", out)
    m, plain = manifest(out), manifest(built["rtx3060ti"])["engines"]["unet"]
    e = m["engines"]["unet"]
    assert m["flags"]["weight_streaming"] is True and manifest(built["rtx3060ti"])["flags"]["weight_streaming"] is False
    assert e["file"] == plain["file"].removesuffix(".plan") + ".ws.plan"
    assert e["builder_flags"] == ["WEIGHT_STREAMING"] and plain["builder_flags"] == []
    # random:tiny fits the 8 GB card many times over: the plan keeps every weight on the device
    assert e["weight_streaming"]["from"] == "plan" and e["weight_streaming"]["budget_bytes"] == e["source"]["onnx_bytes"]
    assert plain["weight_streaming"] is None
    rec = load_engines_manifest(out).record.engines["unet"]
    assert rec.streamable and rec.streaming_budget_bytes == e["source"]["onnx_bytes"]
    assert not load_engines_manifest(built["rtx3060ti"]).record.engines["unet"].streamable
    # TensorRT-RTX builds are deterministic here (same graph, settings and library give the same bytes), so
    # the streamable plan is the plain one with a flag set: same size, a handful of bytes apart
    a, b = (out / e["file"]).read_bytes(), (built["rtx3060ti"] / plain["file"]).read_bytes()
    assert len(a) == len(b) and 0 < sum(x != y for x, y in zip(a, b)) < 64
    assert any("weight streaming" in n for n in m["notes"])


def test_weight_streaming_budget_from_the_profile(folders: dict[str, Path], tmp_path: Path) -> None:
    code, out, err = run_cli("build", "--profile", "rtx3060ti", "--onnx", folders["fp32"], "--onnx", folders["fp16"],
                             *SIZE, "--dry-run", "--no-estimate", "--weight-streaming-budget", "1.5", "--json",
                             "--out", tmp_path / "e")
    assert code == 0, err
    d = json.loads(out)
    assert d["flags"]["weight_streaming"] is True
    assert d["weight_streaming"]["unet"] == {"budget_bytes": int(1.5 * (1 << 30)), "from": "profile"}
    assert d["weight_streaming"]["text_encoder"] == {"budget_bytes": None, "from": "automatic"}
    assert "--weight-streaming-budget 1.5" in d["command"]


# ----- refusals: one line, non-zero exit, nothing left in OUT --------------------------------------

def _nothing_at(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.glob(f".{out.name}*")], list(out.parent.iterdir())


def test_refusals(folders: dict[str, Path], tmp_path: Path) -> None:
    src = ("--onnx", folders["fp32"], "--onnx", folders["fp16"])
    out = tmp_path / "out"
    cases = [
        (("--profile", "h100-80gb", "--library", "tensorrt-rtx", *src), 2,
         "Error: --library tensorrt-rtx cannot build for h100-80gb (sm_90): tensorrt-rtx targets sm_75, sm_80, sm_86, "
         "sm_89, sm_120, sm_121; use --library tensorrt and build on the card"),
        (("--profile", "jetson-agx-orin", "--library", "tensorrt-rtx", *src), 2,
         "Error: --library tensorrt-rtx cannot build for jetson-agx-orin (sm_87): tensorrt-rtx targets sm_75, sm_80, "
         "sm_86, sm_89, sm_120, sm_121; use --library tensorrt and build on the card"),
        (("--profile", "rtx2080ti", "--precision", "fp32", *src), 2,
         "Error: rtx2080ti (sm_75, TensorRT-RTX) cannot build text_encoder in fp32: TensorRT-RTX has no FP32 GEMM on "
         "Turing; use --precision fp16"),
        (("--profile", "rtx3060ti", *src, "--height", "2048", "--width", "128"), 2,
         "Error: unet: input sample needs height 2048 px, outside the range its export recorded (height 128..512 px, "
         f"{folders['fp16']}): the limit is at most 512 px; set --height within it, or re-export at a size "
         "whose range covers it"),
    ]
    for args, code, line in cases:
        r = koala("build", *args, *(() if "--height" in args else SIZE), "--no-estimate", "--out", out, check=False)
        assert (r.returncode, error_line(r)) == (code, line), r.stderr[-1500:]
        _nothing_at(out)
    r = koala("build", "--profile", "rtx3060ti", "--library", "tensorrt-xyz", *src, "--out", out, check=False)
    assert r.returncode == 2 and "Invalid value for '--library': 'tensorrt-xyz' is not one of 'tensorrt', " \
                                 "'tensorrt-rtx'." in r.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = koala("build", "--profile", "rtx3060ti", *src, *SIZE, "--out", blocker / "engines", check=False)
    assert (r.returncode, error_line(r)) == (2, f"Error: cannot write {blocker / 'engines'}: {blocker} is not a "
                                                "writable folder")


def test_vae_in_fp32_for_turing_names_the_way_out(folders: dict[str, Path], tmp_path: Path) -> None:
    profile = tmp_path / "turing.toml"
    text = (Path(__file__).parents[1] / "engines" / "profiles" / "rtx2080ti.toml").read_text()
    profile.write_text(text.replace('precision = "fp16"          # only', 'precision = "fp32"          # only')
                       .replace('fp16_ops = "gemm"', ''))
    r = koala("build", "--profile", profile, "--onnx", folders["fp32"], "--onnx", folders["fp16"], "-c", "vae_decoder",
              *SIZE, "--no-estimate", "--out", tmp_path / "out", check=False)
    assert (r.returncode, error_line(r)) == (2, (
        "Error: rtx2080ti (sm_75, TensorRT-RTX) cannot build vae_decoder in fp32: TensorRT-RTX has no FP32 GEMM on "
        "Turing; make its VAE with FP16 GEMMs (`koala-trt convert --vae-gemm-fp16`) and set vae.precision = \"fp16\" "
        "with vae.fp16_ops = \"gemm\" in the profile (rtx2080ti does), or build on the card with --library tensorrt"))


@pytest.mark.parametrize("field, value, line", [
    ("refit", '"identical"', 'field build.refit = "identical": refit (REFIT_IDENTICAL + STRIP_PLAN) needs a GPU at build '
                             'time with TensorRT-RTX; build on the card with library = "tensorrt" or drop refit'),
    ("hardware_compatibility", '"ampere_plus"', "field build.hardware_compatibility does not apply to TensorRT-RTX: "
                                                "its engines run on the compute capabilities listed in build.targets"),
    ("targets", '["8.6", "9.0"]', "field build.targets lists sm_90, which TensorRT-RTX cannot target (it targets "
                                  "sm_75, sm_80, sm_86, sm_89, sm_120, sm_121)"),
    ("targets", '["8.9"]', "field build.targets must include the profile's own gpu.compute_capability 8.6 (got ['8.9'])"),
    ("library", '"tensorrt-lite"', "field build.library must be one of tensorrt, tensorrt-rtx (got 'tensorrt-lite')"),
])
def test_profile_fields_tensorrt_rtx_cannot_honour(tmp_path: Path, field: str, value: str, line: str) -> None:
    text = (Path(__file__).parents[1] / "engines" / "profiles" / "rtx3060ti.toml").read_text()
    p = tmp_path / "card.toml"
    lines = [line for line in text.splitlines() if not line.startswith(f"{field} =")]  # then set it once
    p.write_text("\n".join(lines).replace("[build]\n", f"[build]\n{field} = {value}\n", 1))
    code, _, err = run_cli("profiles", "show", p)
    assert code == 2 and err.strip().splitlines()[-1] == f"Error: {p}: {line}"


def test_fp8_needs_sm89() -> None:
    from engines.buildplan import check_precision
    from engines.profile import load_profile
    from koala_core.errors import UsageError

    with pytest.raises(UsageError) as e:
        check_precision("unet", "fp8", load_profile("rtx3060ti"))
    assert str(e.value) == "fp8 needs sm_89 or newer; rtx3060ti is sm_86"
    with pytest.raises(UsageError) as e:
        check_precision("unet", "fp8", load_profile("rtx-portable"))  # portable includes sm_86
    assert str(e.value) == "fp8 needs sm_89 or newer; rtx-portable is sm_86"
    check_precision("unet", "fp8", load_profile("rtx4090"))
    check_precision("unet", "fp8", load_profile("rtx5090"))


def test_missing_library_is_one_line() -> None:
    from dataclasses import replace

    from engines.build import check_requirements
    from engines.libraries import TENSORRT_RTX
    from koala_core.errors import KoalaError

    absent = replace(TENSORRT_RTX, module="tensorrt_rtx_not_installed_here")
    with pytest.raises(KoalaError) as e:
        check_requirements(absent)
    assert str(e.value) == ("cannot build tensorrt-rtx engines on this machine, missing: TensorRT-RTX (the "
                            "tensorrt_rtx_not_installed_here Python package: pip install tensorrt-rtx-cu12 (make "
                            "install does)). `koala-trt build --dry-run` shows the plan without them")
    check_requirements(TENSORRT_RTX)  # installed here: nothing missing, no GPU asked for


def test_corrupt_onnx(folders: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(folders["fp32"], src)
    onnx_file = src / "text_encoder" / "model.onnx"
    data = onnx_file.read_bytes()
    onnx_file.write_bytes(data[: len(data) // 2])  # truncated: its recorded size catches it, before any build
    r = koala("build", "--profile", "rtx4090", "--onnx", src, "--precision", "fp32", "-c", "text_encoder", *SIZE,
              "--no-estimate", "--out", tmp_path / "out", check=False)
    assert (r.returncode, error_line(r)) == (2, f"Error: {onnx_file} is corrupt: {len(data) // 2:,} bytes, the manifest "
                                                f"records {len(data):,}")
    onnx_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped: its sha256 catches it
    r = koala("build", "--profile", "rtx4090", "--onnx", src, "--precision", "fp32", "-c", "text_encoder", *SIZE,
              "--no-estimate", "--out", tmp_path / "out", check=False)
    assert (r.returncode, error_line(r)) == (2, f"Error: text_encoder: {onnx_file} does not match its sha256 "
                                                f"in {src}/manifest.json (changed or corrupt); export it again")
    _nothing_at(tmp_path / "out")
    _nothing_at(tmp_path / "out")
    # garbage whose sha256 the manifest was made to agree with: the parser's first error, one line
    onnx_file.write_bytes(b"not an onnx model" * 100)
    m = manifest(src)
    m["files"]["text_encoder/model.onnx"].update(sha256=sha256(onnx_file), bytes=onnx_file.stat().st_size)
    (src / "manifest.json").write_text(json.dumps(m))
    r = koala("build", "--profile", "rtx4090", "--onnx", src, "--precision", "fp32", "-c", "text_encoder", *SIZE,
              "--no-estimate", "--out", tmp_path / "out", check=False)
    line = error_line(r)
    assert r.returncode == 1 and line.startswith(f"Error: TensorRT-RTX could not build {onnx_file}: "), r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) < 500
    _nothing_at(tmp_path / "out")


def test_runtime_without_a_gpu_says_so(built: dict[str, Path]) -> None:
    r = koala("generate", "--backend", "tensorrt", "--engines", built["rtx3060ti"], "--prompt", "a koala", "--steps", "1", "--out",
              built["rtx3060ti"].parent / "x.png", check=False)
    line = error_line(r)
    assert r.returncode == 1 and line.startswith(
        f"Error: the TensorRT backend cannot run the tensorrt-rtx engines of {built['rtx3060ti']} on this machine, "
        "missing: cuda-python"), r.stderr[-1500:]


def test_triton_refuses_tensorrt_rtx_engines(folders: dict[str, Path], built: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = run_cli("triton", "--artifacts", folders["fp16"], "--engines", built["rtx3060ti"], "--out", tmp_path / "r")
    assert (code, err.strip().splitlines()[-1]) == (2, (
        f"Error: {built['rtx3060ti']} holds tensorrt-rtx engines, but Triton's TensorRT backend (platform tensorrt_plan) "
        "loads standard TensorRT plans only: serve the ONNX models (omit --engines), or build the engines with "
        "--library tensorrt on the card"))
    assert not (tmp_path / "r").exists()


@pytest.mark.gpu
def test_rtx_engines_run_on_the_card(built: dict[str, Path], tmp_path: Path) -> None:
    """On an RTX card: the engines built here on the CPU for its compute capability run and match ONNX
    Runtime; on any other GPU the runtime refuses them naming both capabilities."""
    pytest.importorskip("cuda")
    from engines import cuda

    dev = cuda.device_info()
    folder = {"8.6": built["rtx3060ti"], "8.9": built["rtx4090"], "7.5": built["rtx2080ti"]}.get(dev.compute_capability)
    if folder is None:
        r = koala("generate", "--backend", "tensorrt", "--engines", built["rtx4090"], "--prompt", "a koala", "--steps", "1", "--out",
                  tmp_path / "x.png", check=False)
        assert r.returncode != 0 and f"sm_{dev.sm}" in error_line(r) and "sm_89" in error_line(r)
        return
    r = koala("validate", "--engines", folder, "--backend", "tensorrt", "--json", check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list((folder / "runtime-cache").glob("unet.*.cache"))  # the JIT kernels were kept


def test_feature_cache_pair_builds_for_rtx3060ti(tiny_cached_artifacts: Path, tmp_path: Path) -> None:
    """Feature caching's two U-Net graphs (`export --cache-branch`) are built by default where the
    artifacts hold them, each with its own inputs (unet_shallow's deep_feature) in the profile."""
    from engines.buildplan import make_build_plan
    from engines.profile import load_profile

    out = tmp_path / "cached"
    profile = load_profile("rtx3060ti").with_overrides(batch=1, height=128, width=128, precision="fp32")
    plan = make_build_plan([tiny_cached_artifacts], profile, out, estimate=False)
    assert list(plan.components) == ["text_encoder", "text_encoder_2", "vae_decoder", "unet_deep", "unet_shallow"]
    koala("build", "--profile", "rtx3060ti", "--onnx", tiny_cached_artifacts, "--precision", "fp32", "-c", "unet_deep,unet_shallow",
          *SIZE, "--batch", "1", "--no-estimate", "--out", out)
    m = manifest(out)
    assert set(m["engines"]) == {"unet_deep", "unet_shallow"}
    for component in ("unet_deep", "unet_shallow"):
        e = m["engines"][component]
        assert (out / e["file"]).read_bytes()[:4] == b"vtrt" and e["precision"] == "fp32"
    feature = m["engines"]["unet_shallow"]["inputs"]["deep_feature"]
    assert feature["min"][1:] == [64, 16, 16] and feature["max"][0] == 2  # 64 channels at the latents' size (branch 1)
