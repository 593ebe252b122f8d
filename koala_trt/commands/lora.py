from __future__ import annotations

from pathlib import Path

import click

from koala_trt.commands.common import check_out_dir, json_option, log, print_json, progress_option


@click.command("lora")
@click.option("--artifacts", "src", required=True, type=click.Path(path_type=Path), help="FP32 or FP16 artifacts folder to patch.")
@click.option("--lora", "loras", required=True, multiple=True, metavar="FILE[:SCALE]",
              help="LoRA adapter (diffusers/PEFT or kohya safetensors) at SCALE [default 1.0]; repeatable, applied in order.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Artifacts folder to write.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@progress_option()
@json_option("the adapters and patched weights")
def lora_cmd(src: Path, loras: tuple[str, ...], out: Path, force: bool, as_json: bool) -> None:
    """Fuse LoRA adapters into an exported folder's ONNX initializers, as `export --lora` would, without re-exporting."""
    from calibration.lora_patch import patch_artifacts
    from exporter.lora import parse_lora_arg, read_adapter

    adapters = [read_adapter(parse_lora_arg(a)) for a in loras]
    check_out_dir(out, force)
    manifest = patch_artifacts(src, adapters, out, force=force, log=log)
    info = manifest.data["lora_patch"]
    if as_json:
        print_json({"artifacts": str(out), "loras": manifest.data["loras"], "weights": info["weights"], "seconds": info["seconds"]})
        return
    click.echo(f"artifacts: {out}  ({sum(info['weights'].values())} weights patched in {info['seconds']:.1f} s)")
