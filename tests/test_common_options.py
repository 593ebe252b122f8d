"""The options every long-running command shares are one definition each (koala_trt/commands/common.py):
`--no-progress`, `--json` and, where CPU threads matter, `--threads`; and they do what they say, process-
wide (koala_core/run_settings.py), whichever command parses them."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from conftest import run_cli
from koala_core import run_settings
from koala_trt.cli import cli
from koala_trt.commands import common

# command -> the common options it takes (threads: where it runs ONNX Runtime, OpenVINO or PyTorch on the CPU)
LONG_RUNNING = {
    "export": ("--no-progress", "--json", "--threads"),
    "calibrate": ("--no-progress", "--json", "--threads"),
    "convert": ("--no-progress", "--json", "--threads"),
    "quantize": ("--no-progress", "--json", "--threads"),
    "validate": ("--no-progress", "--json", "--threads"),
    "bench": ("--no-progress", "--json", "--threads"),
    "generate": ("--no-progress", "--json", "--threads"),
    "build": ("--no-progress", "--json"),
    "lora": ("--no-progress", "--json"),
    "pack": ("--no-progress", "--json"),
    "unpack": ("--no-progress", "--json"),
}


def _options(name: str) -> dict[str, click.Option]:
    ctx = click.Context(cli)
    cmd = cli.get_command(ctx, name)
    assert cmd is not None
    return {o.opts[0]: o for o in cmd.params if isinstance(o, click.Option)}


@pytest.mark.parametrize("name", sorted(LONG_RUNNING))
def test_each_long_running_command_has_the_common_options(name: str) -> None:
    opts = _options(name)
    for flag in LONG_RUNNING[name]:
        assert flag in opts, f"{name} lacks {flag}"
    # one definition each: the same callback, type and help wording wherever they appear
    progress = opts["--no-progress"]
    assert progress.is_flag and progress.callback is common._set_progress
    assert progress.help == "No progress bars (or per-file progress lines) on stderr; status lines stay."
    j = opts["--json"]
    assert j.is_flag and j.name == "as_json" and (j.help or "").startswith("Print ") and (j.help or "").endswith(" as JSON.")
    if "--threads" in LONG_RUNNING[name]:
        t = opts["--threads"]
        assert t.callback is common._set_threads and isinstance(t.type, click.IntRange) and t.type.min == 1
        assert (t.help or "").endswith("also PyTorch's [default: all cores].")


def test_parsing_sets_and_resets_the_process_settings() -> None:
    cmd = cli.get_command(click.Context(cli), "pack")
    assert cmd is not None
    cmd.make_context("pack", ["--artifacts", "a", "--out", "b.tar.gz", "--no-progress"])
    assert not run_settings.progress_enabled() and run_settings.progress_disabled() is True
    cmd.make_context("pack", ["--artifacts", "a", "--out", "b.tar.gz"])
    assert run_settings.progress_enabled() and run_settings.progress_disabled() is None
    export = cli.get_command(click.Context(cli), "export")
    assert export is not None
    with pytest.raises(click.BadParameter):
        export.make_context("export", ["--model", "random:tiny", "--out", "x", "--threads", "0"])


def test_threads_reach_onnx_runtime_and_torch(tiny_artifacts: Path) -> None:
    import torch

    from koala_core.ort import make_session

    before = torch.get_num_threads()
    graph = tiny_artifacts / "text_encoder" / "model.onnx"
    try:
        run_settings.set_threads(1)
        assert torch.get_num_threads() == 1
        assert make_session(graph, ["CPUExecutionProvider"]).get_session_options().intra_op_num_threads == 1
        assert make_session(graph, ["CPUExecutionProvider"], threads=2).get_session_options().intra_op_num_threads == 2
    finally:
        run_settings.set_threads(None)
    assert torch.get_num_threads() == before and run_settings.default_threads() is None


def test_export_with_the_common_options(tmp_path: Path) -> None:
    code, out, err = run_cli("export", "--model", "random:tiny", "--components", "text_encoder", "--out", tmp_path / "a",
                             "--no-progress", "--threads", "1", "--json")
    assert code == 0, err
    assert list(json.loads(out)["components"]) == ["text_encoder"]
    assert run_settings.default_threads() == 1  # until the next command of this process parses its options
    run_settings.set_threads(None)


def test_pack_no_progress_hides_the_per_file_lines(tiny_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shipping.bundle

    monkeypatch.setattr(shipping.bundle, "LOUD_BYTES", 1)  # every file gets its progress line
    code, _, loud = run_cli("pack", "--artifacts", tiny_artifacts, "--out", tmp_path / "a.tar.gz")
    assert code == 0, loud
    code, _, quiet = run_cli("pack", "--artifacts", tiny_artifacts, "--out", tmp_path / "b.tar.gz", "--no-progress")
    assert code == 0, quiet
    per_file = [ln for ln in loud.splitlines() if ln.startswith("  ") and "model.onnx" in ln]
    assert per_file and not any(ln in quiet.splitlines() for ln in per_file)
    assert (tmp_path / "b.tar.gz").stat().st_size > 0
