from __future__ import annotations

from pathlib import Path

import click

from koala_trt.commands.accuracy_options import accuracy_options, make_check, print_report
from koala_trt.commands.common import POSITIVE, check_out_dir, components_option, json_option, log, print_json, progress_option, threads_option


@click.command("quantize")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(path_type=Path), help="FP32 artifacts folder (from `koala-trt export`).")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration set (from `koala-trt calibrate`); required for int8 and fp8, optional for int8-wo (the U-Net's FP16 ranges).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Artifacts folder to write.")
@click.option("--precision", type=click.Choice(["int8", "fp8", "int8-wo"]), default="int8", show_default=True,
              help="int8: INT8 weights and activations; fp8: FP8 E4M3 weights and activations (sm_89+); "
                   "int8-wo: INT8 weights of the GEMMs, FP16 activations, U-Net and text encoders (sm_80+).")
@click.option("--target", type=click.Choice(["tensorrt", "onnxruntime"]), default="tensorrt", show_default=True,
              help="Q/DQ layout: TensorRT's (int8 symmetric, ModelOpt) or ONNX Runtime CPU's (uint8 activations).")
@components_option("int8-wo only; default: text_encoder,text_encoder_2,unet (int8 and fp8 quantize the U-Net)")
@click.option("--exclude", help="Comma-separated regexes of module paths kept in float [default: NVIDIA's SDXL list].")
@click.option("--quantize-attention", is_flag=True, help="Also quantize attention's activation x activation MatMuls.")
@click.option("--full-range-weights", is_flag=True,
              help="--target onnxruntime: 8-bit weights instead of 7 (ONNX Runtime's reduce_range). Slightly more accurate on CPUs "
                   "with VNNI or AMX; on AVX2-only CPUs their u8 x s8 products saturate (U-Net error about 3x).")
@click.option("--calib-method", type=click.Choice(["max", "mean"]), default="mean", show_default=True,
              help="Reduce per-sample ranges by max, or by mean (NVIDIA's min-mean collection, percentile 100).")
@click.option("--samples", type=POSITIVE, default=64, show_default=True, help="Calibration samples for the activation ranges (spread over prompts and steps).")
@threads_option(what="ONNX Runtime threads for the range pass")
@progress_option()
@accuracy_options
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@json_option("the accuracy report")
def quantize_cmd(onnx_dir: Path, calib: Path | None, out: Path, precision: str, target: str, components: tuple[str, ...], exclude: str | None, quantize_attention: bool,
                 full_range_weights: bool, calib_method: str, samples: int,
                 threads: int | None, heldout: Path | None, heldout_num: int, accuracy_steps: int, accuracy_size: int | None,
                 no_accuracy: bool, no_gate: bool, force: bool, as_json: bool) -> None:
    """Make a quantized artifacts folder: the U-Net with explicit Q/DQ (INT8 or FP8), calibrated on
    recorded trajectories, or INT8 GEMM weights only (int8-wo: U-Net and text encoders)."""
    from calibration.int8 import DEFAULT_EXCLUDE, Int8Options, check_layout, quantize_int8
    from koala_core.errors import UsageError

    check_layout(precision, target, full_range_weights)
    if precision == "int8-wo":
        if target != "tensorrt":
            raise UsageError("--precision int8-wo has the TensorRT layout only (DequantizeLinear on the GEMM weights): drop --target onnxruntime")
        if quantize_attention:
            raise UsageError("--quantize-attention needs quantized activations; --precision int8-wo quantizes weights only")
    elif components:
        raise UsageError(f"--components is for --precision int8-wo; --precision {precision} quantizes the U-Net only")
    elif calib is None:
        raise UsageError(f"--precision {precision} needs --calib: a calibration set from `koala-trt calibrate`")
    check_out_dir(out, force)
    patterns = tuple(s.strip() for s in exclude.split(",") if s.strip()) if exclude is not None else DEFAULT_EXCLUDE
    if precision == "int8-wo":
        from calibration.weight_only import WO_COMPONENTS
        from exporter.specs import parse_components

        names = parse_components(components, default=WO_COMPONENTS) if components else list(WO_COMPONENTS)
        bad = [n for n in names if n not in WO_COMPONENTS]
        if bad:
            raise UsageError(f"--precision int8-wo quantizes {', '.join(WO_COMPONENTS)}; not {', '.join(bad)}")
        _weight_only(onnx_dir, calib, out, names, patterns, heldout, heldout_num, accuracy_steps, accuracy_size, no_accuracy, no_gate, force, as_json)
        return
    opts = Int8Options(precision=precision, target=target, exclude=patterns, quantize_attention=quantize_attention,
                       full_range_weights=full_range_weights, max_samples=samples, method=calib_method, threads=threads, force=force)
    check = make_check(onnx_dir, heldout, heldout_num, accuracy_steps, accuracy_size, no_accuracy)
    log(f"quantizing the U-Net of {onnx_dir} to {precision.upper()} ({target} layout) with {calib} -> {out}")
    manifest, layers = quantize_int8(onnx_dir, calib, out, opts, log=log, check=check,
                                     on_report=None if as_json else print_report, gate=not no_gate)
    conv = manifest.record("unet").conversion or {}
    variant = manifest.view.variant
    if as_json:
        import json

        acc = out / "accuracy.json"
        print_json({"artifacts": str(out), "variant": variant, "unet": conv,
                    "accuracy": json.loads(acc.read_text()) if acc.is_file() else {"layers": layers}})
        return
    click.echo(f"artifacts: {out}  ({precision.upper()} U-Net, {target} layout: {conv['quantized_layers']} layers quantized, "
               f"{conv['excluded_layers']} excluded; {variant['seconds']:.1f} s, "
               f"peak RSS {variant['peak_rss_mb'] / 1024:.2f} GiB)")


def _weight_only(onnx_dir: Path, calib: Path | None, out: Path, names: list[str], patterns: tuple[str, ...], heldout: Path | None, heldout_num: int,
                 accuracy_steps: int, accuracy_size: int | None, no_accuracy: bool, no_gate: bool, force: bool, as_json: bool) -> None:
    from calibration.weight_only import WeightOnlyOptions, quantize_weight_only

    opts = WeightOnlyOptions(components=list(names), exclude=patterns, calib=calib, force=force)
    check = make_check(onnx_dir, heldout, heldout_num, accuracy_steps, accuracy_size, no_accuracy)
    log(f"weight-only INT8 of {onnx_dir} ({', '.join(opts.components)}) -> {out}")
    manifest, layers = quantize_weight_only(onnx_dir, out, opts, log=log, check=check,
                                            on_report=None if as_json else print_report, gate=not no_gate)
    variant = manifest.view.variant
    convs = {n: manifest.record(n).conversion or {} for n in layers}
    if as_json:
        import json

        acc = out / "accuracy.json"
        print_json({"artifacts": str(out), "variant": variant, **convs,
                    "accuracy": json.loads(acc.read_text()) if acc.is_file() else {"layers": layers}})
        return
    done = ", ".join(f"{n} {c['quantized_layers']}" for n, c in convs.items())
    click.echo(f"artifacts: {out}  (INT8-WO: GEMMs with INT8 weights: {done}; {variant['seconds']:.1f} s, "
               f"peak RSS {variant['peak_rss_mb'] / 1024:.2f} GiB)")
