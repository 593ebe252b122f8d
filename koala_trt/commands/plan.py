from __future__ import annotations

import click

from exporter.tolerances import PRECISIONS

from koala_trt.commands.aid_options import aid_options, apply_aids
from koala_trt.commands.common import POSITIVE, log, print_json, table

GIB = 1 << 30


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f}"


def memory_table(plan: object) -> str:
    rows = []
    for name, c in plan.components.items():  # type: ignore[attr-defined]
        rows.append([name, c.precision, f"{c.parameters / 1e6:,.0f}M", _gib(c.weights_bytes), _gib(c.activations_bytes),
                     f"{c.io_bytes / 2**20:.1f}", _gib(c.total_bytes), c.peak_op or c.note])
    return table(rows, ["component", "precision", "params", "weights GiB", "activations GiB", "io MiB", "total GiB",
                        "activation peak at"])


def ladder_table(choice: object) -> str:
    rows = []
    for r in choice.rungs:  # type: ignore[attr-defined]
        p = r.plan
        rows.append([r.name, _gib(p.peak), f"{p.margin_bytes / GIB:+.2f}", "fits" if p.fits else "does not fit",
                     _gib(p.streamed_per_step_bytes) if "streaming" in r.aids else "-", r.note])
    return table(rows, ["tried (each adds to the ones before)", "peak GiB", "margin GiB", "verdict",
                        "streamed GiB/step", "note"])


@click.command("plan")
@click.option("--model", "-m", required=True, help="Hub id, local diffusers folder, or random:<preset>.")
@click.option("--profile", "-p", "profile_ref", required=True, help="GPU profile name or TOML path.")
@click.option("--batch", type=POSITIVE, help="Images per call (static), instead of the profile's range.")
@click.option("--height", type=POSITIVE, help="Image height in px (static), instead of the profile's range.")
@click.option("--width", type=POSITIVE, help="Image width in px (static), instead of the profile's range.")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), help="Precision of the text encoders and U-Net.")
@aid_options
@click.option("--min-margin", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="GIB",
              help="The choice needs at least this much memory to spare.")
@click.option("--controlnet", metavar="DIR_OR_HUB_ID", help="Plan a ControlNet pipeline: the ControlNet and the U-Net taking "
              "its residuals (unet_controlnet) instead of the plain U-Net (`random:` for one built from the U-Net's config).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan_cmd(model: str, profile_ref: str, batch: int | None, height: int | None, width: int | None,
             precision: str | None, vae_tile: int | None, residency: str | None, weight_streaming: bool,
             weight_streaming_budget: float | None, min_margin: float, controlnet: str | None, as_json: bool) -> None:
    """Will the model's engines fit the card? Device memory per component at the profile's largest
    shapes (weights + activations traced on the meta device + I/O), resident and one-at-a-time peaks,
    and a verdict with its margin. Then the memory aids, tried in order (tiled VAE decode, sequential
    residency, weight streaming), and the first that fits with what it costs."""
    from engines.plan_choice import choose
    from engines.planner import check_plan_sizes, plan_memory
    from engines.profile import load_profile
    from exporter.sources import resolve
    from exporter.specs import specs_from_configs

    from engines.buildplan import check_precision

    profile = load_profile(profile_ref).with_overrides(batch, height, width, precision)
    profile = apply_aids(profile, vae_tile, residency, weight_streaming, weight_streaming_budget)
    for component, prec in profile.precision.items():  # what the card cannot build, as `build` refuses it
        check_precision(component, prec, profile)
    source = resolve(model)
    comps = None
    if controlnet is not None:
        from exporter.controlnet import CONTROLNET_COMPONENTS
        from exporter.sources import with_controlnet

        source = with_controlnet(source, controlnet)
        comps = [c for c in profile.components() if c != "unet"] + list(CONTROLNET_COMPONENTS)
    check_plan_sizes(specs_from_configs(source.configs), profile, comps)
    log(f"planning {source.ref}{' with ControlNet ' + controlnet if controlnet else ''} on {profile.name} "
        "(tracing each component on the meta device)")
    choice = choose(profile, lambda p: plan_memory(source, p, comps), min_margin_bytes=int(min_margin * GIB), components=comps)
    plan = choice.rungs[0].plan
    if as_json:
        print_json({**plan.to_json(), **choice.to_json()})
        return
    g = profile.gpu
    s = profile.shapes
    click.echo(f"{source.ref} on {profile.name} ({profile.description}): batch {s.batch[2]}, "
               f"{s.height[2]}x{s.width[2]}{', guidance' if s.guidance else ''}")
    click.echo(memory_table(plan))
    click.echo(f"overhead (CUDA context, TensorRT): {_gib(plan.overhead_bytes)} GiB; usable: {g.memory_gib:g} GiB "
               f"- {g.reserved_gib:g} GiB reserved = {_gib(plan.usable_bytes)} GiB")
    click.echo(f"peak, all resident (shared activations): {_gib(plan.resident_peak)} GiB; one at a time: "
               f"{_gib(plan.sequential_peak)} GiB; engine build: {_gib(plan.build_peak)} GiB "
               f"(workspace {profile.build.workspace_gib:g} GiB)")
    v = plan.verdict()
    word = "FITS" if v["fits"] else "DOES NOT FIT"
    click.echo(f"verdict ({v['mode']}): {word}, margin {v['margin_gib']:+.2f} GiB ({v['margin_percent']:+.1f}% of usable)")
    click.echo(ladder_table(choice))
    click.echo(f"choice: {choice.summary()}")
