"""Shared fixtures: one `random:tiny` export per test session, reused by every test that needs it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--require-gpu", action="store_true", default=False,
                     help="`make test-gpu`: fail (not skip) when TensorRT, cuda-python or a GPU is missing, or a GPU test skips")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--require-gpu"):
        from engines.build import missing_requirements

        missing = missing_requirements()
        if missing:
            pytest.exit(f"make test-gpu cannot test on this machine, missing: {'; '.join(missing)}", returncode=1)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Under --require-gpu a skipped test is a failure: an all-skipped GPU run must never read as a pass."""
    if report.skipped and _REQUIRE_GPU[0]:
        _SKIPPED.append(report.nodeid)


def pytest_sessionstart(session: pytest.Session) -> None:
    _REQUIRE_GPU[0] = bool(session.config.getoption("--require-gpu"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _REQUIRE_GPU[0] and _SKIPPED:
        print(f"\nmake test-gpu: {len(_SKIPPED)} GPU test(s) skipped ({_SKIPPED[0]} ...): a failure under --require-gpu")
        session.exitstatus = 1


_REQUIRE_GPU = [False]
_SKIPPED: list[str] = []


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run `koala-trt ARGS` in-process; returns (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from koala_trt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def tiny_source():
    from exporter.sources import resolve

    return resolve("random:tiny")


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random:tiny exported (all four default components, checked) once per session."""
    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    code, stdout, stderr = run_cli("export", "--model", "random:tiny", "--out", out)
    assert code == 0, stderr
    return out


@pytest.fixture(scope="session")
def tiny_cached_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random:tiny with feature caching's U-Net pair split at branch 1 and no plain unet (the sampler's
    full steps run unet_deep), both checked against PyTorch, once per session."""
    out = tmp_path_factory.mktemp("cached") / "tiny"
    code, stdout, stderr = run_cli("export", "--model", "random:tiny", "--out", out, "--cache-branch", "1",
                                   "--components", "text_encoder,text_encoder_2,vae_decoder")
    assert code == 0, stderr
    return out


@pytest.fixture(scope="session")
def tiny_calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny calibration set of random:tiny: 2 prompts x 3 denoising steps at 128x128 (16x16 latents)."""
    out = tmp_path_factory.mktemp("calibration") / "calib"
    code, stdout, stderr = run_cli("calibrate", "--model", "random:tiny", "--out", out, "--num", "2", "--steps", "3",
                                   "--height", "128", "--width", "128")
    assert code == 0, stderr
    return out


@pytest.fixture(scope="session")
def tiny_encoder_artifacts(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random:tiny with its VAE encoder (img2img, inpainting): the session export plus an export of the
    encoder alone, joined in one folder (hard links; the encoder's export takes seconds)."""
    from tests.img_helpers import add_components

    base = tmp_path_factory.mktemp("encoder")
    code, _, stderr = run_cli("export", "--model", "random:tiny", "--out", base / "enc", "-c", "vae_encoder")
    assert code == 0, stderr
    return add_components(tiny_artifacts, base / "enc", base / "tiny")


@pytest.fixture(scope="session")
def tiny_inpaint_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random:tiny-inpaint (a 9-channel inpainting U-Net), every component, exported at 128 px (64..256)."""
    out = tmp_path_factory.mktemp("artifacts") / "tiny-inpaint"
    code, _, stderr = run_cli("export", "--model", "random:tiny-inpaint", "--out", out, "--height", "128", "--width", "128",
                              "-c", "text_encoder,text_encoder_2,unet,vae_decoder,vae_encoder")
    assert code == 0, stderr
    return out


RTX_SET_CARDS = ("rtx2080ti", "rtx3060ti", "rtx4090")
RTX_SET_ARGS = ("--height", "128", "--width", "128", "--batch", "1", "--no-estimate")


@pytest.fixture(scope="session")
def tiny_fp16_gemm(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random:tiny in FP16, its VAE decoder with FP16 GEMMs only (what rtx2080ti's profile builds from)."""
    out = tmp_path_factory.mktemp("fp16-gemm") / "fp16"
    code, _, err = run_cli("convert", "--onnx", tiny_artifacts, "--out", out, "--vae-gemm-fp16", "--no-accuracy")
    assert code == 0, err
    return out


@pytest.fixture(scope="session")
def tiny_rtx_set(tiny_artifacts: Path, tiny_fp16_gemm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TensorRT-RTX engine set of random:tiny for three cards (rtx2080ti in FP16, rtx3060ti, rtx4090) at
    128x128, built once per session by `koala-trt build --profile rtx2080ti,rtx3060ti,rtx4090` (each card in
    a process of its own; this process imports no TensorRT). test_rtx_build reuses its card folders."""
    if __import__("importlib").util.find_spec("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX is not installed (make install installs it)")
    out = tmp_path_factory.mktemp("rtx-set") / "set"
    code, _, err = run_cli("build", "--profile", ",".join(RTX_SET_CARDS), "--onnx", tiny_artifacts, "--onnx", tiny_fp16_gemm,
                           *RTX_SET_ARGS, "--out", out)
    assert code == 0, err[-3000:]
    return out
