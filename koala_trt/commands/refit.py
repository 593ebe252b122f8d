from __future__ import annotations

from pathlib import Path

import click

from koala_trt.commands.common import components_option, log, print_json


@click.command("refit")
@click.option("--engines", "-e", required=True, type=click.Path(path_type=Path),
              help="Engines folder built refittable (profile [build] refit = \"weights\", standard TensorRT).")
@click.option("--artifacts", "-a", required=True, type=click.Path(path_type=Path),
              help="Artifacts folder with the new weights, e.g. from `koala-trt lora` (same graphs and precision).")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Engines folder to write [default: refit ENGINES in place].")
@components_option("default: every engine of the folder")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--verbose", is_flag=True, help="Show TensorRT's and Polygraphy's log.")
@click.option("--json", "as_json", is_flag=True, help="Print the refitted engines as JSON.")
def refit_cmd(engines: Path, artifacts: Path, out: Path | None, components: tuple[str, ...], force: bool, verbose: bool,
              as_json: bool) -> None:
    """Give refittable TensorRT engines the weights of an artifacts folder (a LoRA patched in by
    `koala-trt lora`) on the GPU, without rebuilding; TensorRT-RTX engines are rebuilt instead."""
    from engines.refit import run_refit
    from exporter.specs import parse_components

    comps = parse_components(components) if components else None
    r = run_refit(engines, artifacts, out, comps, force=force, verbose=verbose, log=log)
    if as_json:
        print_json({k: r[k] for k in ("engines", "refitted", "unchanged")})
        return
    for name, d in r["refitted"].items():
        loras = ", ".join(f"{a['file']} x{a['scale']:g}" for a in d["loras"]) or "no LoRA"
        click.echo(f"{name}: {d['file']} refitted ({d['weights']} weights, {loras}) in {d['seconds']:.1f} s")
    click.echo(f"engines: {r['engines']} ({len(r['refitted'])} refitted, {len(r['unchanged'])} already had these weights)")
