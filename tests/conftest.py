"""Shared fixtures: one `random:tiny` export per test session, reused by every test that needs it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
def tiny_calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny calibration set of random:tiny: 2 prompts x 3 denoising steps at 128x128 (16x16 latents)."""
    out = tmp_path_factory.mktemp("calibration") / "calib"
    code, stdout, stderr = run_cli("calibrate", "--model", "random:tiny", "--out", out, "--num", "2", "--steps", "3",
                                   "--height", "128", "--width", "128")
    assert code == 0, stderr
    return out
