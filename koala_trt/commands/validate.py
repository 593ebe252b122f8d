"""`koala-trt validate`: the accuracy-drift gate of an artifacts folder (ONNX Runtime) or engines
folder (TensorRT) against the PyTorch reference, per component and end to end."""

from __future__ import annotations

from pathlib import Path

import click

from koala_trt.commands.aid_options import check_vae_tile
from koala_trt.commands.image_options import image_args, image_options
from koala_trt.commands.scheduler_option import check_scheduler, scheduler_option
from koala_trt.commands.cache_options import cache_options
from koala_trt.commands.common import NON_NEGATIVE, POSITIVE, check_out_file, components_option, cpu_precision_option, json_option, log, print_json, progress_option, table, threads_option
from koala_core.errors import CheckFailed, UsageError

DEFAULT_PROMPTS = 2  # from calibration/heldout_prompts.txt when --prompts is not given


def _read_prompts(path: Path | None) -> list[str]:
    src = path or Path(__file__).resolve().parents[2] / "calibration" / "heldout_prompts.txt"
    if not src.exists():
        raise UsageError(f"--prompts: no such file {src}")
    if not src.is_file():
        raise UsageError(f"--prompts {src} is a folder; give a text file (one prompt per line)")
    try:
        lines = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise UsageError(f"--prompts {src}: not a UTF-8 text file (one prompt per line)") from None
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise UsageError(f"--prompts {src}: no prompts (one per line; # starts a comment)")
    return prompts if path is not None else prompts[:DEFAULT_PROMPTS]


@click.command("validate")
@click.option("--artifacts", "-a", type=click.Path(path_type=Path), required=True,
              help="Artifacts folder from `koala-trt export` / convert / quantize (specs, tokenizers, precisions; the graphs for onnxruntime).")
@click.option("--backend", "-b", type=click.Choice(["onnxruntime", "openvino", "tensorrt"]), default="onnxruntime", show_default=True,
              help="What runs the candidate.")
@click.option("--engines", type=click.Path(path_type=Path), help="Engines folder from `koala-trt build` (--backend tensorrt).")
@click.option("--model", "-m", help="PyTorch reference: hub id, diffusers folder or random:<preset> [default: the model the artifacts were exported from].")
@components_option("default: every component of the artifacts (end to end runs only when all four sampler components are validated)")
@click.option("--height", type=POSITIVE, help="Image height in pixels [default: the manifest's sampler size, 1024 for full-size models].")
@click.option("--width", type=POSITIVE, help="Image width in pixels [default: the manifest's sampler size].")
@click.option("--steps", type=POSITIVE, default=4, show_default=True, help="Denoising steps of the reference trajectories and the end-to-end run.")
@click.option("--prompts", type=click.Path(path_type=Path),
              help=f"Text file, one prompt per line [default: the first {DEFAULT_PROMPTS} of calibration/heldout_prompts.txt].")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="Seed of the random inputs and of the initial latents.")
@click.option("--random-samples", type=POSITIVE, default=2, show_default=True, help="Random input sets per component.")
@click.option("--tolerance", "-t", "tolerances", multiple=True, metavar="COMPONENT.METRIC=VALUE",
              help="Override a limit, e.g. unet.rel_l2=2e-4, '*.cosine=0.999', end_to_end.psnr=30 (repeatable).")
@click.option("--no-end-to-end", is_flag=True, help="Components only.")
@click.option("--vae-tile", type=int, metavar="PX",
              help="End to end: decode the VAE in overlapping tiles of PX pixels as `generate --vae-tile` does, so the "
                   "image metrics include the tiling's error against diffusers' untiled decode [default: untiled].")
@click.option("--report", type=click.Path(path_type=Path), help="JSON report: every metric, its limit and verdict.")
@click.option("--junit", type=click.Path(path_type=Path), help="JUnit XML report, one testcase per check.")
@click.option("--markdown", type=click.Path(path_type=Path), help="Markdown summary table.")
@click.option("--html", "html_path", type=click.Path(path_type=Path),
              help="Self-contained HTML report: the verdict, per prompt the reference and candidate images with an error "
                   "heatmap, per check the metrics against their limits (failures first).")
@click.option("--save-baseline", type=click.Path(path_type=Path), help="Write this run's metrics as a baseline.")
@click.option("--baseline", type=click.Path(path_type=Path), help="Fail metrics that got worse than this baseline beyond the margin.")
@click.option("--baseline-margin", type=float, default=None, help="Relative margin over the baseline's error [default: 0.5].")
@threads_option()
@progress_option()
@cache_options()
@cpu_precision_option()
@click.option("--no-verify", is_flag=True, help="Check artifact file sizes only, not their sha256.")
@scheduler_option()
@image_options()
@click.option("--verbose", is_flag=True, help="Polygraphy's comparison log on stderr.")
@json_option("the report (every metric, its limit and verdict) instead of the table")
def validate_cmd(artifacts: Path, backend: str, engines: Path | None, model: str | None, components: tuple[str, ...],
                 height: int | None, width: int | None, steps: int, prompts: Path | None, seed: int, random_samples: int,
                 tolerances: tuple[str, ...], no_end_to_end: bool, report: Path | None, junit: Path | None,
                 markdown: Path | None, save_baseline: Path | None, baseline: Path | None, baseline_margin: float | None,
                 threads: int | None, cpu_precision: str | None, no_verify: bool, verbose: bool, as_json: bool,
                 vae_tile: int | None, scheduler: str | None, image: Path | None, strength: float | None, mask: Path | None,
                 cache_interval: int, cache_branch: int | None, html_path: Path | None) -> None:
    """Check that an artifact still computes what the PyTorch model computes.

    Per component, on random inputs and on inputs from real prompts, at the artifact's real size:
    max abs error, relative L2, cosine similarity, non-finite values. End to end: the numpy sampler
    on the backend against the diffusers pipeline from the same latents: final-latent relative L2,
    image PSNR and SSIM. Exit 0 when every metric holds, 1 on any drift (reports are written first),
    2 on usage errors."""
    from exporter.cache_branch import check_interval
    from exporter.specs import COMPONENTS, parse_components
    from exporter.tolerances import parse_overrides
    from koala_core.jsonfile import write_json
    from validation import baseline as bl
    from validation.reports import SUMMARY_HEADER, summary_rows, write_junit, write_markdown
    from validation.run import ValidateOptions, default_size, finish, settings, validate

    overrides = parse_overrides(tolerances)
    names = parse_components(components, default=tuple(COMPONENTS)) if components else None
    if backend == "tensorrt" and engines is None:
        raise UsageError("--backend tensorrt needs --engines DIR (a `koala-trt build` folder)")
    if backend != "tensorrt" and engines is not None:
        raise UsageError("--engines is for --backend tensorrt")
    if baseline_margin is not None and (baseline is None or baseline_margin < 0):
        raise UsageError("--baseline-margin needs --baseline and a value >= 0")
    check_vae_tile(vae_tile)
    check_scheduler(scheduler)
    image_inputs = image_args(image, mask, strength)
    check_interval(cache_interval)
    if cache_interval > 1 and no_end_to_end:
        raise UsageError("--cache-interval is for the end-to-end run; drop --no-end-to-end")
    if vae_tile is not None and no_end_to_end:
        raise UsageError("--vae-tile is for the end-to-end run; drop --no-end-to-end")
    if not Path(artifacts).is_dir():
        raise UsageError(f"--artifacts {artifacts} is not a folder")
    for flag, out in (("--report", report), ("--junit", junit), ("--markdown", markdown), ("--html", html_path),
                      ("--save-baseline", save_baseline)):
        if out is not None:
            check_out_file(out, flag)
    base = bl.read_baseline(baseline) if baseline is not None else None
    opts = ValidateOptions(artifacts=artifacts, backend=backend, model=model, engines=engines, components=names, height=height,
                           width=width, steps=steps, prompts=_read_prompts(prompts), seed=seed, random_samples=random_samples,
                           overrides=overrides, end_to_end=not no_end_to_end, verify=not no_verify, threads=threads,
                           cpu_precision=cpu_precision, verbose=verbose, vae_tile=vae_tile, scheduler=scheduler,
                           image_inputs=image_inputs or None, cache_interval=cache_interval, cache_branch=cache_branch)
    if base is not None:  # before anything runs: a baseline compares only with a run on the same inputs
        assert baseline is not None
        h, w = default_size(artifacts, height, width)
        bl.check_settings(base, settings(opts, h, w), baseline)
    result = validate(opts, log)
    if base is not None:
        assert baseline is not None
        summary = bl.apply(result["_checks"], base, bl.DEFAULT_MARGIN if baseline_margin is None else baseline_margin)
        result["baseline"] = {"path": str(baseline), **summary}
    saved = bl.baseline_json(result["_checks"], settings(opts, result["height"], result["width"]), str(artifacts))
    images = result.pop("_images", [])
    data = finish(result)
    if report is not None:
        write_json(report, data, allow_nan=False)
    if junit is not None:
        write_junit(junit, data)
    if markdown is not None:
        write_markdown(markdown, data)
    if html_path is not None:
        from validation.html_report import write_html

        write_html(html_path, data, images)
    if save_baseline is not None:
        write_json(save_baseline, saved, allow_nan=False)
    if as_json:
        print_json(data)
    else:
        click.echo(table(summary_rows(data), SUMMARY_HEADER))
        n = len(data["checks"])
        failed = sum(not c["passed"] for c in data["checks"])
        click.echo(f"{n - failed}/{n} checks passed ({data['seconds']:.1f} s)")
    for path, what in ((report, "JSON report"), (junit, "JUnit XML"), (markdown, "Markdown"), (html_path, "HTML report"),
                       (save_baseline, "baseline")):
        if path is not None:
            log(f"{what}: {path}")
    if not data["passed"]:
        shown = data["failures"][:3]
        more = f" (+{len(data['failures']) - 3} more)" if len(data["failures"]) > 3 else ""
        raise CheckFailed("accuracy drift: " + "; ".join(shown) + more)
