"""Bad inputs of `koala-trt convert`, `quantize` and `calibrate`: exact exit code and error line, checked
before any graph is converted or any model runs; an interrupted convert leaves nothing at OUT."""

from __future__ import annotations

from pathlib import Path

import pytest

from bad_inputs import check_case, run_and_terminate, staging_leftovers

RANGE = "Error: Invalid value for '{flag}': {v} is not in the range x>={lo}."
CONVERT = ["convert", "--onnx", "{ART}", "--out", "{T}/out"]
QUANTIZE = ["quantize", "--onnx", "{ART}", "--calib", "{CAL}", "--out", "{T}/out"]
CALIBRATE = ["calibrate", "--model", "random:tiny", "--out", "{T}/out"]
CONVERTING = "converting {src} to FP16 -> {{T}}/out\n"  # convert's opening line, before it reads anything
QUANTIZING = "quantizing the U-Net of {src} to INT8 (tensorrt layout) with {cal} -> {{T}}/out\n"
DIFFERENT_UNET = ("Error: calibration set {T}/foreigncal was recorded with a different U-Net (random:tiny-sdxl) "
                  "than {ART} holds (random:tiny)")
INCOMPLETE = ("Error: calibration set {T}/halfcal is incomplete (1/2 prompts); re-run the same `koala-trt calibrate` "
              "command to finish it")

CASES = [
    # --- convert: counts and sizes
    ("convert-samples-0", [*CONVERT, "--samples", "0"], 2, RANGE.format(flag="--samples", v=0, lo=1)),
    ("convert-heldout-num-0", [*CONVERT, "--heldout-num", "0"], 2, RANGE.format(flag="--heldout-num", v=0, lo=1)),
    ("convert-accuracy-steps-negative", [*CONVERT, "--accuracy-steps", "-1"], 2, RANGE.format(flag="--accuracy-steps", v=-1, lo=1)),
    ("convert-accuracy-size-0", [*CONVERT, "--accuracy-size", "0"], 2, RANGE.format(flag="--accuracy-size", v=0, lo=1)),
    ("convert-accuracy-size-not-a-multiple", [*CONVERT, "--accuracy-size", "100"], 2,
     "Error: unet: height and width must be multiples of 32 (got 100x100)"),
    # --- convert: outputs
    ("convert-out-exists", ["convert", "--onnx", "{ART}", "--out", "{DIR}"], 2, "Error: {DIR} already exists; pass --force to replace it"),
    ("convert-out-unwritable", ["convert", "--onnx", "{ART}", "--out", "{FILE}/out"], 2,
     "Error: cannot write {FILE}/out: {FILE} is not a writable folder"),
    # --- convert: inputs
    ("convert-onnx-missing", ["convert", "--onnx", "{T}/nothing", "--out", "{T}/out"], 2,
     "Error: artifacts folder {T}/nothing does not exist"),
    ("convert-onnx-is-a-file", ["convert", "--onnx", "{FILE}", "--out", "{T}/out"], 2,
     "Error: artifacts folder {FILE} does not exist"),
    ("convert-onnx-empty", ["convert", "--onnx", "{EMPTY}", "--out", "{T}/out"], 2,
     "Error: {EMPTY} is not a koala-trt artifacts folder (no manifest.json); create one with `koala-trt export`"),
    ("convert-manifest-invalid-json", ["convert", "--onnx", "{BADJSON}", "--out", "{T}/out"], 2,
     "Error: {BADJSON}/manifest.json is corrupt: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("convert-manifest-cut-off", ["convert", "--onnx", "{HALFMANIFEST}", "--out", "{T}/out"], 2,
     "Error: {HALFMANIFEST}/manifest.json is corrupt: Unterminated string starting at: line 8 column 20 (char 180)"),
    ("convert-manifest-no-keys", ["convert", "--onnx", "{NOKEYS}", "--out", "{T}/out"], 2,
     "Error: {NOKEYS}/manifest.json is not a koala-trt artifacts manifest (format None)"),
    ("convert-graph-truncated", ["convert", "--onnx", "{TRUNC}", "--out", "{T}/out", "--no-accuracy"], 2,
     CONVERTING.format(src="{TRUNC}") + "Error: {TRUNC}: unet/model.onnx does not match its sha256 in the manifest (changed or corrupt)"),
    ("convert-graph-missing", ["convert", "--onnx", "{NOGRAPH}", "--out", "{T}/out", "--no-accuracy"], 2,
     CONVERTING.format(src="{NOGRAPH}") + "Error: {NOGRAPH}: missing file unet/model.onnx"),
    ("convert-heldout-missing", [*CONVERT, "--heldout", "{T}/nothing.txt"], 2, "Error: prompts file {T}/nothing.txt does not exist"),
    ("convert-calib-missing", [*CONVERT, "--calib", "{T}/nothing", "--no-accuracy"], 2,
     CONVERTING.format(src="{ART}") + "Error: calibration folder {T}/nothing does not exist"),
    ("convert-calib-is-artifacts", [*CONVERT, "--calib", "{ART}", "--no-accuracy"], 2,
     CONVERTING.format(src="{ART}") + "Error: {ART}/manifest.json is not a koala-trt calibration manifest (format 'koala-trt/artifacts')"),
    ("convert-calib-other-model", [*CONVERT, "--calib", "{FOREIGNCAL}", "--no-accuracy"], 2,
     CONVERTING.format(src="{ART}") + DIFFERENT_UNET),
    ("convert-calib-incomplete", [*CONVERT, "--calib", "{HALFCAL}", "--no-accuracy"], 2,
     CONVERTING.format(src="{ART}") + INCOMPLETE),
    # --- quantize
    ("quantize-samples-negative", [*QUANTIZE, "--samples", "-3"], 2, RANGE.format(flag="--samples", v=-3, lo=1)),
    ("quantize-threads-0", [*QUANTIZE, "--threads", "0"], 2, RANGE.format(flag="--threads", v=0, lo=1)),
    ("quantize-out-exists", ["quantize", "--onnx", "{ART}", "--calib", "{CAL}", "--out", "{ART}"], 2,
     "Error: {ART} already exists; pass --force to replace it"),
    ("quantize-out-unwritable", ["quantize", "--onnx", "{ART}", "--calib", "{CAL}", "--out", "{FILE}/out"], 2,
     "Error: cannot write {FILE}/out: {FILE} is not a writable folder"),
    ("quantize-onnx-manifest-no-keys", ["quantize", "--onnx", "{NOKEYS}", "--calib", "{CAL}", "--out", "{T}/out"], 2,
     "Error: {NOKEYS}/manifest.json is not a koala-trt artifacts manifest (format None)"),
    ("quantize-graph-truncated", ["quantize", "--onnx", "{TRUNC}", "--calib", "{CAL}", "--out", "{T}/out", "--no-accuracy"], 2,
     QUANTIZING.format(src="{TRUNC}", cal="{CAL}")
     + "Error: {TRUNC}: unet/model.onnx does not match its sha256 in the manifest (changed or corrupt)"),
    ("quantize-calib-missing", ["quantize", "--onnx", "{ART}", "--calib", "{T}/nothing", "--out", "{T}/out", "--no-accuracy"], 2,
     QUANTIZING.format(src="{ART}", cal="{T}/nothing") + "Error: calibration folder {T}/nothing does not exist"),
    ("quantize-calib-invalid-json", ["quantize", "--onnx", "{ART}", "--calib", "{BADJSON}", "--out", "{T}/out", "--no-accuracy"], 2,
     QUANTIZING.format(src="{ART}", cal="{BADJSON}")
     + "Error: {BADJSON}/manifest.json is corrupt: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("quantize-calib-other-model", ["quantize", "--onnx", "{ART}", "--calib", "{FOREIGNCAL}", "--out", "{T}/out", "--no-accuracy"], 2,
     QUANTIZING.format(src="{ART}", cal="{FOREIGNCAL}") + DIFFERENT_UNET),
    ("quantize-calib-incomplete", ["quantize", "--onnx", "{ART}", "--calib", "{HALFCAL}", "--out", "{T}/out", "--no-accuracy"], 2,
     QUANTIZING.format(src="{ART}", cal="{HALFCAL}") + INCOMPLETE),
    # --- quantize --precision fp8 / int8-wo (issue 14)
    ("quantize-fp8-no-calib", ["quantize", "--precision", "fp8", "--onnx", "{ART}", "--out", "{T}/out"], 2,
     "Error: --precision fp8 needs --calib: a calibration set from `koala-trt calibrate`"),
    ("quantize-fp8-onnxruntime-layout", [*QUANTIZE, "--precision", "fp8", "--target", "onnxruntime"], 2,
     "Error: --precision fp8 has the TensorRT layout only (ONNX Runtime has no FP8 kernels on CPU): drop --target onnxruntime"),
    ("quantize-full-range-weights-tensorrt", [*QUANTIZE, "--full-range-weights"], 2,
     "Error: --full-range-weights is for --target onnxruntime (the TensorRT layout's weights are 8-bit already)"),
    ("quantize-full-range-weights-int8-wo", ["quantize", "--precision", "int8-wo", "--onnx", "{ART}", "--out", "{T}/out", "--full-range-weights"], 2,
     "Error: --full-range-weights is for --target onnxruntime (the TensorRT layout's weights are 8-bit already)"),
    ("quantize-fp8-components", [*QUANTIZE, "--precision", "fp8", "-c", "unet"], 2,
     "Error: --components is for --precision int8-wo; --precision fp8 quantizes the U-Net only"),
    ("quantize-fp8-calib-missing", ["quantize", "--precision", "fp8", "--onnx", "{ART}", "--calib", "{T}/nothing", "--out", "{T}/out"], 2,
     QUANTIZING.replace("INT8", "FP8").format(src="{ART}", cal="{T}/nothing") + "Error: calibration folder {T}/nothing does not exist"),
    ("quantize-fp8-calib-incomplete", ["quantize", "--precision", "fp8", "--onnx", "{ART}", "--calib", "{HALFCAL}", "--out", "{T}/out"], 2,
     QUANTIZING.replace("INT8", "FP8").format(src="{ART}", cal="{HALFCAL}") + INCOMPLETE),
    ("quantize-wo-onnxruntime-layout", ["quantize", "--precision", "int8-wo", "--onnx", "{ART}", "--out", "{T}/out", "--target", "onnxruntime"], 2,
     "Error: --precision int8-wo has the TensorRT layout only (DequantizeLinear on the GEMM weights): drop --target onnxruntime"),
    ("quantize-wo-quantize-attention", ["quantize", "--precision", "int8-wo", "--onnx", "{ART}", "--out", "{T}/out", "--quantize-attention"], 2,
     "Error: --quantize-attention needs quantized activations; --precision int8-wo quantizes weights only"),
    ("quantize-wo-vae", ["quantize", "--precision", "int8-wo", "--onnx", "{ART}", "--out", "{T}/out", "-c", "unet,vae_decoder"], 2,
     "Error: --precision int8-wo quantizes text_encoder, text_encoder_2, unet; not vae_decoder"),
    ("quantize-wo-calib-missing", ["quantize", "--precision", "int8-wo", "--onnx", "{ART}", "--calib", "{T}/nothing", "--out", "{T}/out"], 2,
     "weight-only INT8 of {ART} (text_encoder, text_encoder_2, unet) -> {T}/out\n"
     "Error: calibration folder {T}/nothing does not exist"),
    ("quantize-wo-calib-other-model", ["quantize", "--precision", "int8-wo", "--onnx", "{ART}", "--calib", "{FOREIGNCAL}", "--out", "{T}/out"], 2,
     "weight-only INT8 of {ART} (text_encoder, text_encoder_2, unet) -> {T}/out\n" + DIFFERENT_UNET),
    # --- calibrate
    ("calibrate-num-0", [*CALIBRATE, "--num", "0"], 2, RANGE.format(flag="--num", v=0, lo=1)),
    ("calibrate-steps-negative", [*CALIBRATE, "--steps", "-1"], 2, RANGE.format(flag="--steps", v=-1, lo=1)),
    ("calibrate-height-0", [*CALIBRATE, "--height", "0"], 2, RANGE.format(flag="--height", v=0, lo=1)),
    ("calibrate-seed-negative", [*CALIBRATE, "--seed", "-1"], 2, RANGE.format(flag="--seed", v=-1, lo=0)),
    ("calibrate-num-beyond-prompts", [*CALIBRATE, "--num", "100000"], 2,
     "Error: --num 100000 is more than the 160 prompts in calibration/prompts.txt"),
    ("calibrate-prompts-missing", [*CALIBRATE, "--prompts", "{T}/nothing.txt"], 2, "Error: prompts file {T}/nothing.txt does not exist"),
    ("calibrate-prompts-is-a-folder", [*CALIBRATE, "--prompts", "{EMPTY}"], 2,
     "Error: prompts file {EMPTY} is not a file (one prompt per line)"),
    ("calibrate-out-unwritable", ["calibrate", "--model", "random:tiny", "--out", "{FILE}/out", "--num", "1", "--steps", "1"], 2,
     "Error: cannot write {FILE}/out: {FILE} is not a writable folder"),
    ("calibrate-out-is-a-file", ["calibrate", "--model", "random:tiny", "--out", "{FILE}", "--num", "1", "--steps", "1"], 2,
     "calibrating random:tiny: 1 prompts x 1 steps at 256x256, guidance 5.0 -> {FILE}\n"
     "Error: {FILE} exists and is not a calibration set; choose another --out or pass --force"),
    ("calibrate-model-empty-folder", ["calibrate", "--model", "{EMPTY}", "--out", "{T}/out"], 2,
     "Error: {EMPTY} is not a diffusers model folder (no model_index.json)"),
]


@pytest.mark.parametrize("argv,code,stderr", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_convert_quantize_calibrate_refuse(argv: list[str], code: int, stderr: str, tmp_path: Path, tiny_artifacts: Path,
                                           tiny_calibration: Path) -> None:
    check_case(argv, code, stderr, tmp_path, {"ART": tiny_artifacts, "CAL": tiny_calibration})
    assert not (tmp_path / "out").exists() and not staging_leftovers(tmp_path / "out")


def test_prompts_that_are_not_text(tmp_path: Path) -> None:
    bad = tmp_path / "prompts.bin"
    bad.write_bytes(b"\xff\xfe\x00binary")
    check_case(["calibrate", "--model", "random:tiny", "--out", "{T}/out", "--prompts", str(bad)], 2,
               f"Error: prompts file {bad} is not UTF-8 text (one prompt per line)", tmp_path, {})


def test_interrupted_convert_leaves_nothing(tmp_path: Path, tiny_artifacts: Path) -> None:
    """SIGTERM once convert is writing its staging folder: OUT never appears, nothing is left beside it."""
    out = tmp_path / "fp16"

    def writing() -> bool:
        return any(tmp_path.glob(".fp16.partial-*/manifest.json")) or any(tmp_path.glob(".fp16.partial-*/*/*.onnx"))

    code, err = run_and_terminate(["convert", "--onnx", str(tiny_artifacts), "--out", str(out), "--no-accuracy"], out, writing)
    assert err.strip().splitlines()[-1] == "Interrupted: nothing was left half-written.", err
    assert code == 130
    assert not out.exists()
    assert staging_leftovers(out) == []
