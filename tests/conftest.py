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
