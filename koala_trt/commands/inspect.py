from __future__ import annotations

import click

from koala_trt.commands.common import print_json, table


_SHORT = {"batch": "B", "height": "H", "width": "W", "latent_height": "h", "latent_width": "w", "sequence": "T"}


def _dims(t: dict) -> str:
    return f"{t['name']}[{','.join(_SHORT.get(str(d), str(d)) for d in t['dims'])}]"


def _is_engines_folder(target: str) -> bool:
    import json
    from pathlib import Path

    from engines.engine_manifest import FORMAT, MANIFEST

    p = Path(target).expanduser() / MANIFEST
    try:
        return p.is_file() and json.loads(p.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _lora_cell(loras: list) -> str:
    return ", ".join(f"{a['file']} x{a['scale']:g} ({a['sha256'][:12]})" for a in loras) or "none"


def _inspect_engines(target: str, as_json: bool) -> None:
    from engines.engine_manifest import inspect_engines

    info = inspect_engines(target)
    if as_json:
        print_json(info)
        return
    lib, tg = info["library"], info["targets"]
    ccs = ", ".join("sm_" + c.replace(".", "") for c in tg["compute_capabilities"])
    built = info["built_on"]["name"] if info["built_on"] else "a CPU"
    click.echo(f"engines {info['engines_folder']}: {lib['name']} {lib['version']} for {ccs}, built on {built}; refit {info['refit']}")
    rows = [[c, e["file"], str(e["precision"]), f"{e['bytes'] / 2**20:,.1f}", _lora_cell(e["loras"])]
            for c, e in info["engines"].items()]
    click.echo(table(rows, ["component", "engine", "precision", "MiB", "LoRA adapters (scale, sha256)"]))


def _inspect_set(target: str, as_json: bool) -> None:
    """An engine set (engines/engine_set.py): its cards and the summary table its build wrote."""
    from engines.engine_set import load_set

    es = load_set(target)
    if as_json:
        print_json(es.data)
        return
    click.echo(f"engine set {target}: {len(es.cards)} card(s)")
    for c in es.cards.values():
        a = c.data.get("aids", {})
        aids = ", ".join([*([f"vae tile {a['vae_tile']} px"] if a.get("vae_tile") else []),
                          *(["sequential residency"] if a.get("residency") == "sequential" else []),
                          *(["weight streaming"] if a.get("weight_streaming") else [])]) or "none"
        click.echo(f"  {c.describe()} in {c.path}/; memory aids: {aids}{' (--auto)' if a.get('auto') else ''}")
    rows = [[r["card"], r["component"], r["precision"], f"{r['mib']:,.1f}", "skipped" if r["skipped"] else f"{r['build_s']:.1f}",
             "-" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:,.0f}"] for r in es.data.get("summary", [])]
    click.echo(table(rows, ["card", "component", "precision", "MiB", "build s", "peak RSS MiB"]))


@click.command("inspect")
@click.argument("target", metavar="MODEL_OR_ARTIFACTS")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_cmd(target: str, as_json: bool) -> None:
    """Show a model's components (hub id, diffusers folder, random:<preset>), an artifacts or engines folder's
    manifest, or an engine set's cards."""
    from exporter.inspect import inspect

    from engines.engine_set import is_engine_set

    if _is_engines_folder(target):
        return _inspect_engines(target, as_json)
    if is_engine_set(target):
        return _inspect_set(target, as_json)
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
        for a in info.get("loras", []):
            layers = ", ".join(f"{c} {n}" for c, n in a.get("layers", {}).items())
            click.echo(f"LoRA {a['file']} x{a['scale']:g} (sha256 {a['sha256'][:12]}): layers {layers}")
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
