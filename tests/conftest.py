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


@pytest.fixture(autouse=True)
def _no_debug_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """`koala-trt --debug` run in-process sets KOALA_TRT_DEBUG for the whole process; undo it after
    each test so later tests see one-line errors, not tracebacks."""
    monkeypatch.delenv("KOALA_TRT_DEBUG", raising=False)
