from __future__ import annotations

from pathlib import Path

import click

from koala_trt.commands.accuracy_options import accuracy_options, make_check, print_report
from koala_trt.commands.common import POSITIVE, check_out_dir, log, print_json


@click.command("quantize")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(path_type=Path), help="FP32 artifacts folder (from `koala-trt export`).")
@click.option("--calib", required=True, type=click.Path(path_type=Path), help="Calibration set (from `koala-trt calibrate`).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Artifacts folder to write.")
@click.option("--target", type=click.Choice(["tensorrt", "onnxruntime"]), default="tensorrt", show_default=True,
              help="Q/DQ layout: TensorRT's (int8 symmetric, ModelOpt) or ONNX Runtime CPU's (uint8 activations).")
@click.option("--exclude", help="Comma-separated regexes of module paths kept in float [default: NVIDIA's SDXL list].")
@click.option("--quantize-attention", is_flag=True, help="Also quantize attention's activation x activation MatMuls.")
@click.option("--calib-method", type=click.Choice(["max", "mean"]), default="mean", show_default=True,
              help="Reduce per-sample ranges by max, or by mean (NVIDIA's min-mean collection, percentile 100).")
@click.option("--samples", type=POSITIVE, default=64, show_default=True, help="Calibration samples for the activation ranges (spread over prompts and steps).")
@click.option("--threads", type=POSITIVE, help="ONNX Runtime threads for the range pass.")
@accuracy_options
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the accuracy report as JSON.")
def quantize_cmd(onnx_dir: Path, calib: Path, out: Path, target: str, exclude: str | None, quantize_attention: bool, calib_method: str, samples: int,
                 threads: int | None, heldout: Path | None, heldout_num: int, accuracy_steps: int, accuracy_size: int | None,
                 no_accuracy: bool, no_gate: bool, force: bool, as_json: bool) -> None:
    """Make an INT8 artifacts folder: the U-Net with explicit Q/DQ, calibrated on recorded trajectories."""
    from calibration.int8 import DEFAULT_EXCLUDE, Int8Options, quantize_int8

    check_out_dir(out, force)
    patterns = tuple(s.strip() for s in exclude.split(",") if s.strip()) if exclude is not None else DEFAULT_EXCLUDE
    opts = Int8Options(target=target, exclude=patterns, quantize_attention=quantize_attention, max_samples=samples, method=calib_method,
                       threads=threads, force=force)
    check = make_check(onnx_dir, heldout, heldout_num, accuracy_steps, accuracy_size, no_accuracy)
    log(f"quantizing the U-Net of {onnx_dir} to INT8 ({target} layout) with {calib} -> {out}")
    manifest, layers = quantize_int8(onnx_dir, calib, out, opts, log=log, check=check,
                                     on_report=None if as_json else print_report, gate=not no_gate)
    conv = manifest.component("unet")["conversion"]
    if as_json:
        import json

        acc = out / "accuracy.json"
        print_json({"artifacts": str(out), "variant": manifest.data["variant"], "unet": conv,
                    "accuracy": json.loads(acc.read_text()) if acc.is_file() else {"layers": layers}})
        return
    click.echo(f"artifacts: {out}  (INT8 U-Net, {target} layout: {conv['quantized_layers']} layers quantized, "
               f"{conv['excluded_layers']} excluded; {manifest.data['variant']['seconds']:.1f} s, "
               f"peak RSS {manifest.data['variant']['peak_rss_mb'] / 1024:.2f} GiB)")
