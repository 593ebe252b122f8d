from __future__ import annotations

from pathlib import Path

import click

from koala_trt.commands.accuracy_options import accuracy_options, make_check, print_report
from koala_trt.commands.common import POSITIVE, check_out_dir, components_option, json_option, log, print_json, progress_option, threads_option


@click.command("convert")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(path_type=Path), help="FP32 artifacts folder (from `koala-trt export`).")
@click.option("--precision", type=click.Choice(["fp16"]), default="fp16", show_default=True, help="Target precision (INT8: `koala-trt quantize`).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Artifacts folder to write.")
@components_option("default: text_encoder,text_encoder_2,unet (the VAE decoder stays FP32 unless --vae-fp16)")
@click.option("--vae-fp16", is_flag=True, help="Also convert the VAE decoder (only with an fp16-safe VAE; checked for non-finite outputs).")
@click.option("--vae-gemm-fp16", is_flag=True, help="Also convert the VAE decoder's GEMMs (its attention) to FP16, the rest "
              "FP32: the VAE TensorRT-RTX builds for Turing (rtx2080ti).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration set (`koala-trt calibrate`) for the U-Net's ranges [default: spec inputs].")
@click.option("--samples", type=POSITIVE, default=4, show_default=True, help="Calibration samples AutoCast runs the FP32 U-Net on.")
@click.option("--data-max", type=float, default=512.0, show_default=True, help="Keep a node FP32 when its activations exceed this magnitude.")
@click.option("--keep-fp32", "keep_fp32", help="Comma-separated op types kept FP32 [default: normalizations].")
@accuracy_options
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@threads_option(expose=False, what="ONNX Runtime threads of the range and accuracy runs")
@progress_option()
@json_option("the accuracy report")
def convert_cmd(onnx_dir: Path, precision: str, out: Path, components: tuple[str, ...], vae_fp16: bool, vae_gemm_fp16: bool,
                calib: Path | None,
                samples: int, data_max: float, keep_fp32: str | None, heldout: Path | None, heldout_num: int, accuracy_steps: int,
                accuracy_size: int | None, no_accuracy: bool, no_gate: bool, force: bool, as_json: bool) -> None:
    """Make an FP16 artifacts folder: U-Net and text encoders in FP16 with FP32 islands, graph I/O unchanged."""
    from calibration.fp16 import FP16_COMPONENTS, KEEP_FP32_OPS, Fp16Options, convert_fp16
    from exporter.specs import parse_components
    from koala_core.errors import UsageError

    if samples < 1:
        raise UsageError("--samples must be at least 1")
    check_out_dir(out, force)
    names = parse_components(components, default=FP16_COMPONENTS)
    keep = tuple(s.strip() for s in keep_fp32.split(",") if s.strip()) if keep_fp32 is not None else KEEP_FP32_OPS
    opts = Fp16Options(components=names, vae_fp16=vae_fp16, vae_gemm_fp16=vae_gemm_fp16, calib=calib, samples=samples, keep_fp32_ops=keep,
                       data_max=data_max, force=force)
    check = make_check(onnx_dir, heldout, heldout_num, accuracy_steps, accuracy_size, no_accuracy)
    log(f"converting {onnx_dir} to FP16 -> {out}")
    manifest = convert_fp16(onnx_dir, out, opts, log=log, check=check,
                            on_report=None if as_json else print_report, gate=not no_gate)
    variant = manifest.view.variant
    if as_json:
        import json

        acc = out / "accuracy.json"
        print_json({"artifacts": str(out), "variant": variant,
                    "accuracy": json.loads(acc.read_text()) if acc.is_file() else None})
        return
    click.echo(f"artifacts: {out}  (FP16: {', '.join(variant['converted'])}; "
               f"{variant['seconds']:.1f} s, peak RSS {variant['peak_rss_mb'] / 1024:.2f} GiB)")
