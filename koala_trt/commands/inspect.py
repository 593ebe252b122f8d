from __future__ import annotations

import click

from koala_trt.commands.common import print_json, table


@click.command("inspect")
@click.argument("target", metavar="MODEL_OR_ARTIFACTS")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_cmd(target: str, as_json: bool) -> None:
    """Show a model's components (hub id, diffusers folder, random:<preset>) or an artifacts folder's manifest."""
    from exporter.inspect import inspect

    info = inspect(target)
    if as_json:
        print_json(info)
        return
    if "artifacts" in info:
        click.echo(f"artifacts {info['artifacts']}: from {info['source']['model']} (opset {info['opset']})")
        rows = [[n, c.get("precision", "fp32"), f"{c.get('parameters', 0) / 1e6:,.1f}M",
                 ", ".join(f"{t['name']}{tuple(t['dims'])}" for t in c["spec"]["inputs"]),
                 "x".join(str(v) for v in (c["shape_range"]["height"][0], c["shape_range"]["height"][2]))]
                for n, c in info["components"].items()]
        click.echo(table(rows, ["component", "precision", "params", "inputs", "height range"]))
        click.echo(f"{len(info.get('files', {}))} files with sha256 in manifest.json")
        return
    click.echo(f"{info['model']} ({info['kind']}){': ' + info['description'] if info['description'] else ''}")
    rows = [[n, c["class"], f"{c['parameters']:,}", ", ".join(f"{k}={v}" for k, v in c["config"].items())]
            for n, c in info["components"].items()]
    click.echo(table(rows, ["component", "class", "parameters", "key config"]))
    s = info["sampler"]
    click.echo(f"total {info['total_parameters']:,} parameters; sampler: {s['steps']} steps, guidance {s['guidance']}, "
               f"{s['timestep_spacing']} spacing; native size {info['default_size']}x{info['default_size']}")
