from __future__ import annotations

import click

from koala_trt.commands.common import print_json, table


@click.group("profiles")
def profiles_cmd() -> None:
    """GPU profiles: what to build for each card and how much memory it offers."""


@profiles_cmd.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(as_json: bool) -> None:
    """The built-in profiles (engines/profiles/*.toml)."""
    from engines.profile import list_profiles

    profiles = list_profiles()
    if as_json:
        print_json({"profiles": [p.to_json() for p in profiles]})
        return
    rows = []
    for p in profiles:
        s = p.shapes
        size = "x".join(str(v[0]) if v[0] == v[2] else f"{v[0]}-{v[2]}" for v in (s.height, s.width))
        batch = str(s.batch[0]) if s.batch[0] == s.batch[2] else f"{s.batch[0]}-{s.batch[2]}"
        rows.append([p.name, f"sm_{p.gpu.sm}", f"{p.gpu.memory_gib:g} GiB", f"{p.gpu.memory_gib - p.gpu.reserved_gib:g} GiB",
                     p.precision["unet"], p.vae.precision, f"{batch} @ {size}", p.runtime.residency, p.description])
    click.echo(table(rows, ["profile", "sm", "memory", "usable", "unet", "vae", "batch @ size", "residency", "card"]))


@profiles_cmd.command("show")
@click.argument("name", metavar="NAME_OR_TOML")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_cmd(name: str, as_json: bool) -> None:
    """One profile, built-in by NAME or your own TOML file by path (validated)."""
    from engines.profile import load_profile

    p = load_profile(name)
    if as_json:
        print_json(p.to_json())
        return
    d = p.to_json()
    click.echo(f"{p.name}: {p.description} ({'built-in' if p.source == 'builtin' else p.source})")
    for section in ("gpu", "precision", "vae", "shapes", "build", "runtime"):
        click.echo(f"[{section}]")
        for k, v in d[section].items():
            click.echo(f"  {k} = {v}")
