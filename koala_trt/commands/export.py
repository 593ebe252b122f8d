from __future__ import annotations

from pathlib import Path

import click

from koala_trt.commands.common import POSITIVE, check_out_dir, components_option, json_option, log, print_json, progress_option, table, threads_option


@click.command("export")
@click.option("--model", "-m", required=True, help="Hub id, local diffusers folder, or random:<preset> (e.g. random:tiny).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Artifacts folder to write.")
@components_option("default: text_encoder,text_encoder_2,unet,vae_decoder")
@click.option("--vae", "vae_path", type=click.Path(path_type=Path), help="A separate AutoencoderKL folder to use instead of the pipeline's VAE (e.g. an fp16-safe SDXL VAE).")
@click.option("--opset", type=POSITIVE, default=18, show_default=True, help="ONNX opset.")
@click.option("--batch", type=POSITIVE, default=2, show_default=True, help="Batch to trace and check at (2 = one image with CFG).")
@click.option("--height", type=POSITIVE, help="Image height to trace and check at [default: the model's native size].")
@click.option("--width", type=POSITIVE, help="Image width to trace and check at [default: the model's native size].")
@click.option("--check-size", type=POSITIVE, help="Image side (px) to check U-Net and VAE at [default: U-Net 512, VAE 256, at most the export size].")
@click.option("--no-check", is_flag=True, help="Skip the ONNX Runtime vs PyTorch check (not recommended).")
@click.option("--static", is_flag=True, help="Fixed shapes (batch x height x width): faster export; the graphs run at that shape only.")
@click.option("--max-prompt-chunks", type=POSITIVE, help="Longest prompt the U-Net takes, in chunks of 75 tokens "
              "(77 encoder positions each) [default: 3, i.e. 231 tokens].")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Fuse a LoRA adapter (diffusers/PEFT or kohya safetensors) into the weights, at SCALE [default 1.0]; repeatable.")
@click.option("--cache-branch", type=int, help="Feature caching (DeepCache): also export unet_deep and unet_shallow split at this "
              "branch (3 x up block + layer, as DeepCache's cache_branch_id; 0 is the cheapest cached step); see docs/feature-cache.md.")
@click.option("--controlnet", metavar="DIR_OR_HUB_ID", help="Also export this ControlNet (a diffusers ControlNetModel folder or hub id; "
              "`random:` builds one from the U-Net's config) and the U-Net variant taking its residuals (unet_controlnet).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@threads_option(expose=False, what="ONNX Runtime threads of the check against PyTorch")
@progress_option()
@json_option("the manifest's component summary")
def export_cmd(model: str, out: Path, components: tuple[str, ...], vae_path: Path | None, opset: int, batch: int, height: int | None,
               width: int | None, check_size: int | None, no_check: bool, static: bool, max_prompt_chunks: int | None,
               loras: tuple[str, ...], cache_branch: int | None, controlnet: str | None, force: bool, as_json: bool) -> None:
    """Export a KOALA/SDXL pipeline's components to ONNX, each checked in ONNX Runtime against PyTorch."""
    from exporter.export import ExportOptions, export
    from exporter.lora import parse_lora_arg, read_adapter
    from exporter.sources import resolve, with_vae
    from exporter.specs import parse_components

    opts = ExportOptions(components=parse_components(components), opset=opset, batch=batch, height=height,
                         width=width, check=not no_check, check_size=check_size, force=force, static=static,
                         max_prompt_chunks=max_prompt_chunks, cache_branch=cache_branch, loras=[read_adapter(parse_lora_arg(a)) for a in loras])
    check_out_dir(out, force)
    source = resolve(model)
    if vae_path is not None:
        source = with_vae(source, vae_path)
    if controlnet is not None:
        from exporter.controlnet import CONTROLNET_COMPONENTS
        from exporter.sources import with_controlnet

        source = with_controlnet(source, controlnet)  # its residuals checked against the U-Net's, before any weight
        opts.components += [c for c in CONTROLNET_COMPONENTS if c not in opts.components]
    manifest = export(source, out, opts, log=log)
    comps = manifest.view.components
    if as_json:
        print_json({"artifacts": str(out), "export": manifest.view.export,
                    "components": {k: {"export": v.export, "check": v.check} for k, v in comps.items()}})
        return
    rows = []
    for name, c in comps.items():
        e, chk = c.export or {}, c.check or {}
        worst = max((o["rel_l2"] for o in chk.get("outputs", {}).values()), default=float("nan"))
        rows.append([name, f"{(c.parameters or 0) / 1e6:,.1f}M", f"{e['nodes']:,}", f"{e['seconds']:.1f}",
                     f"{e['peak_rss_mb'] / 1024:.2f}", f"{worst:.1e}" if chk else "skipped"])
    click.echo(table(rows, ["component", "params", "nodes", "export s", "peak GiB", "rel L2 vs torch"]))
    click.echo(f"artifacts: {out}  ({manifest.view.export['seconds']:.1f} s, peak RSS "
               f"{manifest.view.export['peak_rss_mb'] / 1024:.2f} GiB)")
