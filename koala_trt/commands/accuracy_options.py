"""Accuracy-report options and output shared by `convert` and `quantize`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from koala_trt.commands.common import POSITIVE, log, table


def accuracy_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed([
        click.option("--heldout", type=click.Path(path_type=Path), help="Held-out prompts for the accuracy report [default: the shipped calibration/heldout_prompts.txt]."),
        click.option("--heldout-num", type=POSITIVE, default=2, show_default=True, help="Held-out prompts to compare on."),
        click.option("--accuracy-steps", type=POSITIVE, default=4, show_default=True, help="Denoising steps of the held-out trajectories."),
        click.option("--accuracy-size", type=POSITIVE, help="Image side (px) of the accuracy run [default: min(export size, 512)]."),
        click.option("--no-accuracy", is_flag=True, help="Skip the accuracy report (not recommended)."),
        click.option("--no-gate", is_flag=True, help="Write the folder even when the accuracy gate fails."),
    ]):
        f = opt(f)
    return f


def make_check(onnx_dir: Path, heldout: Path | None, heldout_num: int, steps: int, size: int | None,
               no_accuracy: bool) -> Callable[[Any], dict[str, Any]] | None:
    """The accuracy check to run on the staged variant (None with --no-accuracy)."""
    if no_accuracy:
        return None
    from calibration.dataset import load_prompts
    from exporter.manifest import load_manifest
    from koala_core.errors import UsageError
    from validation.heldout import AccuracyOptions, accuracy_report

    if heldout_num < 1 or steps < 1:
        raise UsageError("--heldout-num and --accuracy-steps must be at least 1")
    prompts = load_prompts(heldout, heldout=True)[:heldout_num]
    src = load_manifest(onnx_dir)
    spec = src.spec("unet") if "unet" in src.components else None
    exp = (src.record("unet").export or {}) if spec else {"height": 512, "width": 512}
    m = spec.size_multiple if spec else 8
    if size is not None:
        if spec:
            spec.check_size(size, size)
        h = w = size
    else:
        h, w = (max(m, min(v, 512) // m * m) for v in (exp["height"], exp["width"]))
    ref = src.view.source.model
    opts = AccuracyOptions(prompts=prompts, height=h, width=w, steps=steps)

    def check(folder: Path) -> dict[str, Any]:
        log(f"accuracy: `koala-trt validate` against PyTorch FP32 ({ref}) on {len(prompts)} held-out prompts, "
            f"{steps} steps at {w}x{h}, seed {opts.seed}")
        return accuracy_report(folder, opts, log=lambda m: log(f"      {m}"))

    return check


def print_report(report: dict[str, Any]) -> None:
    from validation.heldout import REPORT_HEADER, report_rows

    click.echo(table(report_rows(report), REPORT_HEADER))
    tol = report["tolerance"]
    click.echo(f"gate ({report['precision']}): relative L2 <= {tol['rel_l2']}, max abs <= {tol['max_abs_rel']} x max(1, |reference|); "
               f"end-to-end latents are reported (non-finite fails): {'passed' if report['passed'] else 'FAILED'}")
