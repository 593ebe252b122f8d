from __future__ import annotations

from pathlib import Path

import click

from koala_trt.commands.common import NON_NEGATIVE, POSITIVE, json_option, log, print_json, progress_option, threads_option


@click.command("calibrate")
@click.option("--model", "-m", required=True, help="Hub id, local diffusers folder, or random:<preset>.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Calibration folder to write (or resume).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), help="Prompts file, one a line [default: the shipped calibration/prompts.txt].")
@click.option("--num", type=POSITIVE, default=32, show_default=True, help="Number of prompts (the first N of the file).")
@click.option("--steps", type=POSITIVE, default=20, show_default=True, help="Denoising steps per prompt (all recorded).")
@click.option("--height", type=POSITIVE, help="Image height [default: the model's native size].")
@click.option("--width", type=POSITIVE, help="Image width [default: the model's native size].")
@click.option("--guidance", type=float, help="Guidance scale [default: the model's].")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="Seed of prompt 0 (prompt i uses seed + i).")
@click.option("--force", is_flag=True, help="Replace OUT instead of resuming it.")
@threads_option(expose=False, what="PyTorch threads of the reference pipeline")
@progress_option()
@json_option("the calibration summary")
def calibrate_cmd(model: str, out: Path, prompts_file: Path | None, num: int, steps: int, height: int | None,
                  width: int | None, guidance: float | None, seed: int, force: bool, as_json: bool) -> None:
    """Record the U-Net's inputs at every denoising step of the PyTorch reference pipeline (resumable)."""
    from calibration.capture import CaptureOptions, capture
    from calibration.dataset import load_prompts
    from exporter.sources import resolve
    from koala_core.atomic import check_writable_parent
    from koala_core.errors import UsageError
    from koala_core.meter import Meter

    if num < 1:
        raise UsageError("--num must be at least 1")
    prompts = load_prompts(prompts_file)
    if num > len(prompts):
        raise UsageError(f"--num {num} is more than the {len(prompts)} prompts in {prompts_file or 'calibration/prompts.txt'}")
    check_writable_parent(out)
    source = resolve(model)
    opts = CaptureOptions(prompts=prompts[:num], steps=steps, height=source.default_size if height is None else height,
                          width=source.default_size if width is None else width,
                          guidance=source.sampler.guidance if guidance is None else guidance, seed=seed, force=force)
    log(f"calibrating {source.ref}: {num} prompts x {steps} steps at {opts.width}x{opts.height}, guidance {opts.guidance} -> {out}")
    with Meter() as m:
        cs = capture(source, out, opts, log=log)
    summary = {"calibration": str(out), "prompts": len(cs.view.shards), "samples": cs.num_samples,
               "batch": cs.view.shards[0].shapes["sample"][1], "height": opts.height, "width": opts.width,
               "seconds": round(m.seconds, 1), "peak_rss_mb": round(m.peak_rss_mb, 1)}
    if as_json:
        print_json(summary)
        return
    click.echo(f"calibration: {out}  ({summary['prompts']} prompts, {summary['samples']} U-Net samples of batch "
               f"{summary['batch']}, {summary['seconds']:.1f} s, peak RSS {summary['peak_rss_mb'] / 1024:.2f} GiB)")
