from __future__ import annotations

import click

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


@click.command("plan")
@click.option("--model", "-m", required=True, help="Hub id, local diffusers folder, or random:<preset>.")
@click.option("--profile", "-p", "profile_ref", required=True, help="GPU profile name or TOML path.")
@click.option("--batch", type=POSITIVE, help="Images per call (static), instead of the profile's range.")
@click.option("--height", type=POSITIVE, help="Image height in px (static), instead of the profile's range.")
@click.option("--width", type=POSITIVE, help="Image width in px (static), instead of the profile's range.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), help="Precision of the text encoders and U-Net.")
@click.option("--residency", type=click.Choice(["resident", "sequential"]),
              help="Which peak the verdict uses [default: the profile's residency].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan_cmd(model: str, profile_ref: str, batch: int | None, height: int | None, width: int | None,
             precision: str | None, residency: str | None, as_json: bool) -> None:
    """Will the model's engines fit the card? Device memory per component at the profile's largest
    shapes (weights + activations traced on the meta device + I/O), resident and one-at-a-time peaks,
    and a verdict with its margin."""
    from engines.planner import check_plan_sizes, plan_memory
    from engines.profile import load_profile
    from exporter.sources import resolve
    from exporter.specs import specs_from_configs

    profile = load_profile(profile_ref).with_overrides(batch, height, width, precision)
    source = resolve(model)
    check_plan_sizes(specs_from_configs(source.configs), profile)
    log(f"planning {source.ref} on {profile.name} (tracing each component on the meta device)")
    plan = plan_memory(source, profile, mode=residency)
    if as_json:
        print_json(plan.to_json())
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
