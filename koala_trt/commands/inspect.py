from __future__ import annotations

import click

from koala_trt.commands.common import print_json, table


_SHORT = {"batch": "B", "height": "H", "width": "W", "latent_height": "h", "latent_width": "w", "sequence": "T"}


def _dims(t: dict) -> str:
    return f"{t['name']}[{','.join(_SHORT.get(str(d), str(d)) for d in t['dims'])}]"


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
        rows = []
        for n, c in info["components"].items():
            spec, r = c["spec"], c["shape_range"]
            size = f"{r['height'][0]}..{r['height'][2]} x {r['width'][0]}..{r['width'][2]}" if spec["spatial"] else "-"
            rows.append([n, c.get("precision", "fp32"), f"{c.get('parameters', 0) / 1e6:,.1f}M",
                         " ".join(_dims(t) for t in spec["inputs"]), " ".join(_dims(t) for t in spec["outputs"]),
                         f"{r['batch'][0]}..{r['batch'][2]}", size])
        click.echo(table(rows, ["component", "precision", "params", "inputs", "outputs", "batch", "pixels (h x w)"]))
        chunks = [c["shape_range"]["prompt_chunks"] for c in info["components"].values() if c["shape_range"].get("prompt_chunks")]
        click.echo("dims: B batch, H/W image pixels, h/w latent cells"
                   + (f", T prompt tokens (77 per chunk, {chunks[0][0] * 77}..{chunks[0][2] * 77})" if chunks else ""))
        click.echo(f"{len(info.get('files', {}))} files with sha256 in manifest.json")
        cpu = info.get("cpu")
        if cpu:
            click.echo(f"this CPU: {cpu['model']} (ISA {cpu['isa']}); --backend openvino --cpu-precision auto runs "
                       f"{cpu['openvino_auto_precision']} here (the VAE decoder fp32)")
        return
    click.echo(f"{info['model']} ({info['kind']}){': ' + info['description'] if info['description'] else ''}")
    rows = [[n, c["class"], f"{c['parameters']:,}", ", ".join(f"{k}={v}" for k, v in c["config"].items())]
            for n, c in info["components"].items()]
    click.echo(table(rows, ["component", "class", "parameters", "key config"]))
    s = info["sampler"]
    click.echo(f"total {info['total_parameters']:,} parameters; sampler: {s['steps']} steps, guidance {s['guidance']}, "
               f"{s['timestep_spacing']} spacing; native size {info['default_size']}x{info['default_size']}")
