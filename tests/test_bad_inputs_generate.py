"""Bad inputs of `koala-trt generate`, `validate` and `bench`: exact exit code and error line, checked
before any network runs (no PNG, no report, no CSV is left behind)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bad_inputs import check_case

RANGE = "Error: Invalid value for '{flag}': {v} is not in the range x>={lo}."
GEN = ["generate", "--artifacts", "{ART}", "--prompt", "a red fox", "--out", "{T}/out.png"]
GEN_TRT = ["generate", "--backend", "tensorrt", "--prompt", "a red fox", "--out", "{T}/out.png", "--engines"]
VAL = ["validate", "--artifacts", "{ART}"]
BENCH = ["bench", "--artifacts", "{ART}"]
TRT_MISSING = ("Error: the TensorRT backend cannot run the tensorrt engines of {ENG} on this machine, missing: TensorRT (the "
               "tensorrt Python package: standard TensorRT, from NVIDIA's index: pip install 'koala-trt[gpu]'); cuda-python (pip install cuda-python) (the onnxruntime backend "
               "runs the same pipeline without them)")
NO_SPEC = ("Error: {ENGNOSPEC}/manifest.json is not a complete engines manifest: engines.unet has no 'spec' "
           "(rebuild with `koala-trt build`)")
ENG_BAD_JSON = "Error: {ENGBADJSON}/manifest.json is corrupt: Expecting ',' delimiter: line 1 column 6 (char 5)"
SCHED = "Error: --scheduler: unknown scheduler 'dpm++'; known: euler, euler_a, heun, dpmpp_2m, dpmpp_2m_karras, ddim, unipc, lcm"
HALF = "Error: {HALFMANIFEST}/manifest.json is corrupt: Unterminated string starting at: line 8 column 20 (char 180)"

CASES = [
    # --- generate
    ("generate-steps-0", [*GEN, "--steps", "0"], 2, RANGE.format(flag="--steps", v=0, lo=1)),
    ("generate-steps-negative", [*GEN, "--steps", "-1"], 2, RANGE.format(flag="--steps", v=-1, lo=1)),
    ("generate-steps-beyond-the-schedule", [*GEN, "--steps", "5000"], 2, "...\nError: --steps must be between 1 and 1000 (got 5000)"),
    ("generate-batch-0", [*GEN, "--batch", "0"], 2, RANGE.format(flag="--batch", v=0, lo=1)),
    ("generate-height-0", [*GEN, "--height", "0"], 2, RANGE.format(flag="--height", v=0, lo=1)),
    ("generate-width-negative", [*GEN, "--width", "-256"], 2, RANGE.format(flag="--width", v=-256, lo=1)),
    ("generate-seed-negative", [*GEN, "--seed", "-1"], 2, RANGE.format(flag="--seed", v=-1, lo=0)),
    ("generate-threads-0", [*GEN, "--threads", "0"], 2, RANGE.format(flag="--threads", v=0, lo=1)),
    ("generate-height-not-a-multiple", [*GEN, "--height", "100"], 2,
     "...\nError: --height and --width must be positive multiples of 8 (got 100x256)"),
    ("generate-vae-tile-not-a-multiple", [*GEN, "--vae-tile", "100"], 2, "Error: --vae-tile must be a positive multiple of 8 px (got 100)"),
    ("generate-vae-tile-0", [*GEN, "--vae-tile", "0"], 2, "Error: --vae-tile must be a positive multiple of 8 px (got 0)"),
    ("generate-vae-tile-larger-than-the-image", [*GEN, "--vae-tile", "512", "--width", "384"], 2,
     "...\nError: --vae-tile must not be larger than the image (512 px > 384x256 px); use at most 256 px, or no --vae-tile"),
    ("generate-vae-tile-below-the-export-range", [*GEN, "--vae-tile", "64"], 2,
     "...\nError: 64x64 is outside the sizes vae_decoder was exported for (height 128..512, width 128..512); the VAE "
     "decodes 64x64 tiles: pick a --vae-tile inside that range"),
    ("generate-out-is-a-folder", [*GEN, "--out", "{DIR}"], 2,
     "Error: --out {DIR} is a folder; give a file name such as {DIR}/image.png"),
    ("generate-out-unwritable", [*GEN, "--out", "{FILE}/out.png"], 2,
     "Error: cannot write {FILE}/out.png: {FILE} is not a writable folder"),
    ("generate-artifacts-missing", [*GEN, "--artifacts", "{T}/nothing"], 2, "Error: artifacts folder {T}/nothing does not exist"),
    ("generate-artifacts-empty", [*GEN, "--artifacts", "{EMPTY}"], 2,
     "Error: {EMPTY} is not a koala-trt artifacts folder (no manifest.json); create one with `koala-trt export`"),
    ("generate-artifacts-manifest-cut-off", [*GEN, "--artifacts", "{HALFMANIFEST}"], 2, HALF),
    ("generate-artifacts-manifest-no-keys", [*GEN, "--artifacts", "{NOKEYS}"], 2,
     "Error: {NOKEYS}/manifest.json is not a koala-trt artifacts manifest (format None)"),
    ("generate-artifacts-is-an-engines-folder", [*GEN, "--artifacts", "{ENG}"], 2,
     "Error: {ENG}/manifest.json is not a koala-trt artifacts manifest (format 'koala-trt/engines')"),
    ("generate-graph-truncated", [*GEN, "--artifacts", "{TRUNC}"], 2,
     "Error: {TRUNC}/unet/model.onnx is corrupt: {UNET_HALF:,} bytes, the manifest records {UNET_BYTES:,}"),
    ("generate-graph-missing", [*GEN, "--artifacts", "{NOGRAPH}"], 2, "Error: missing artifact file {NOGRAPH}/unet/model.onnx"),
    ("generate-latents-missing", [*GEN, "--latents", "{T}/nothing.npy"], 2, "Error: --latents: no such file {T}/nothing.npy"),
    ("generate-engines-missing", [*GEN_TRT, "{T}/nothing"], 2, "Error: engines folder {T}/nothing does not exist"),
    ("generate-engines-is-artifacts", [*GEN_TRT, "{ART}"], 2,
     "Error: {ART}/manifest.json is not a koala-trt engines manifest (format 'koala-trt/artifacts')"),
    ("generate-engines-manifest-invalid-json", [*GEN_TRT, "{ENGBADJSON}"], 2, ENG_BAD_JSON),
    ("generate-engines-manifest-without-spec", [*GEN_TRT, "{ENGNOSPEC}"], 2, NO_SPEC),
    ("generate-engines-without-tensorrt", [*GEN_TRT, "{ENG}"], 1, TRT_MISSING),
    ("generate-scheduler-unknown", [*GEN, "--scheduler", "dpm++"], 2, SCHED),
    ("generate-cache-interval-0", [*GEN, "--cache-interval", "0"], 2,
     "Error: --cache-interval must be a whole number >= 1 (1: no caching; got 0)"),
    ("generate-cache-interval-negative", [*GEN, "--cache-interval", "-3"], 2,
     "Error: --cache-interval must be a whole number >= 1 (1: no caching; got -3)"),
    ("generate-cache-without-the-pair", [*GEN, "--cache-interval", "3"], 2,
     "...\nError: --cache-interval 3 needs the U-Net pair unet_deep and unet_shallow; neither is there: re-export with "
     "`koala-trt export --cache-branch B` (and convert/build the pair like the unet)"),
    ("generate-cache-branch-the-unet-lacks", [*GEN, "--cache-interval", "2", "--cache-branch", "5"], 2,
     "...\nError: --cache-branch 5: this U-Net has branches 0, 1, 3, 4, 6, 7 (3 up blocks of 2, 2, 2 layers; "
     "branch = 3 x block + layer, as DeepCache numbers them)"),
    ("generate-verify-and-no-verify", [*GEN, "--verify", "--no-verify"], 2, "Error: --verify and --no-verify contradict each other; pass one"),
    # --- validate
    ("validate-scheduler-unknown", [*VAL, "--scheduler", "dpm++"], 2, SCHED),
    ("bench-scheduler-unknown", [*BENCH, "--scheduler", "dpm++"], 2, SCHED),
    ("validate-steps-0", [*VAL, "--steps", "0"], 2, RANGE.format(flag="--steps", v=0, lo=1)),
    ("validate-random-samples-0", [*VAL, "--random-samples", "0"], 2, RANGE.format(flag="--random-samples", v=0, lo=1)),
    ("validate-height-negative", [*VAL, "--height", "-32"], 2, RANGE.format(flag="--height", v=-32, lo=1)),
    ("validate-seed-negative", [*VAL, "--seed", "-1"], 2, RANGE.format(flag="--seed", v=-1, lo=0)),
    ("validate-baseline-margin-negative", [*VAL, "--baseline", "{FILE}", "--baseline-margin", "-1"], 2,
     "Error: --baseline-margin needs --baseline and a value >= 0"),
    ("validate-report-is-a-folder", [*VAL, "--report", "{DIR}"], 2, "Error: --report {DIR} is a folder; give a file name"),
    ("validate-junit-unwritable", [*VAL, "--junit", "{FILE}/j.xml"], 2, "Error: cannot write {FILE}/j.xml: {FILE} is not a writable folder"),
    ("validate-save-baseline-is-a-folder", [*VAL, "--save-baseline", "{DIR}"], 2,
     "Error: --save-baseline {DIR} is a folder; give a file name"),
    ("validate-artifacts-missing", ["validate", "--artifacts", "{T}/nothing"], 2, "Error: --artifacts {T}/nothing is not a folder"),
    ("validate-artifacts-is-a-file", ["validate", "--artifacts", "{FILE}"], 2, "Error: --artifacts {FILE} is not a folder"),
    ("validate-artifacts-manifest-invalid-json", ["validate", "--artifacts", "{BADJSON}"], 2,
     "Error: {BADJSON}/manifest.json is corrupt: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("validate-artifacts-manifest-cut-off", ["validate", "--artifacts", "{HALFMANIFEST}"], 2, HALF),
    ("validate-graph-missing", ["validate", "--artifacts", "{NOGRAPH}", "--no-end-to-end"], 2,
     "Error: missing artifact file {NOGRAPH}/unet/model.onnx"),
    ("validate-baseline-missing", [*VAL, "--baseline", "{T}/nothing.json"], 2, "Error: missing file {T}/nothing.json"),
    ("validate-baseline-invalid-json", [*VAL, "--baseline", "{BADJSON}/manifest.json"], 2,
     "Error: {BADJSON}/manifest.json is corrupt: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("validate-baseline-not-a-baseline", [*VAL, "--baseline", "{NOKEYS}/manifest.json"], 2,
     "Error: --baseline {NOKEYS}/manifest.json: not a koala-trt validate baseline (expected format "
     "koala-trt-validate-baseline/1; write one with --save-baseline)"),
    ("validate-prompts-missing", [*VAL, "--prompts", "{T}/nothing.txt"], 2, "Error: --prompts: no such file {T}/nothing.txt"),
    ("validate-prompts-is-a-folder", [*VAL, "--prompts", "{EMPTY}"], 2,
     "Error: --prompts {EMPTY} is a folder; give a text file (one prompt per line)"),
    ("validate-tolerance-unknown-metric", [*VAL, "-t", "unet.nope=3"], 2,
     "Error: --tolerance 'unet.nope=3': unknown metric 'nope'; unet takes rel_l2, max_abs, cosine"),
    ("validate-tensorrt-without-engines", [*VAL, "--backend", "tensorrt"], 2,
     "Error: --backend tensorrt needs --engines DIR (a `koala-trt build` folder)"),
    # --- bench
    ("bench-runs-0", [*BENCH, "--runs", "0"], 2, RANGE.format(flag="--runs", v=0, lo=1)),
    ("bench-warmup-negative", [*BENCH, "--warmup", "-1"], 2, RANGE.format(flag="--warmup", v=-1, lo=0)),
    ("bench-batch-0", [*BENCH, "--batch", "0"], 2, RANGE.format(flag="--batch", v=0, lo=1)),
    ("bench-steps-0", [*BENCH, "--steps", "0"], 2, RANGE.format(flag="--steps", v=0, lo=1)),
    ("bench-threads-0", [*BENCH, "--threads", "0"], 2, RANGE.format(flag="--threads", v=0, lo=1)),
    ("bench-height-not-a-multiple", [*BENCH, "--height", "100"], 2,
     "...\nError: --height and --width must be positive multiples of 8 (got 100x256)"),
    ("bench-unknown-component", [*BENCH, "-c", "unet,nope"], 2,
     "Error: unknown component 'nope'; expected one of text_encoder, text_encoder_2, unet, vae_decoder, vae_encoder, unet_deep, unet_shallow, controlnet, unet_controlnet"),
    ("bench-csv-is-a-folder", [*BENCH, "--csv", "{DIR}"], 2, "Error: --csv {DIR} is a folder; give a file name"),
    ("bench-csv-unwritable", [*BENCH, "--csv", "{FILE}/x.csv"], 2, "Error: cannot write {FILE}/x.csv: {FILE} is not a writable folder"),
    ("bench-artifacts-missing", ["bench", "--artifacts", "{T}/nothing"], 2, "Error: artifacts folder {T}/nothing does not exist"),
    ("bench-artifacts-manifest-cut-off", ["bench", "--artifacts", "{HALFMANIFEST}"], 2, HALF),
    ("bench-graph-truncated", ["bench", "--artifacts", "{TRUNC}"], 2,
     "Error: {TRUNC}/unet/model.onnx is corrupt: {UNET_HALF:,} bytes, the manifest records {UNET_BYTES:,}"),
    ("bench-engines-manifest-without-spec", ["bench", "--backend", "tensorrt", "--engines", "{ENGNOSPEC}"], 2, NO_SPEC),
    ("bench-engines-manifest-invalid-json", ["bench", "--backend", "tensorrt", "--engines", "{ENGBADJSON}"], 2, ENG_BAD_JSON),
    ("bench-engines-without-tensorrt", ["bench", "--backend", "tensorrt", "--engines", "{ENG}"], 1, TRT_MISSING),
]


@pytest.mark.parametrize("argv,code,stderr", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_generate_validate_bench_refuse(argv: list[str], code: int, stderr: str, tmp_path: Path, tiny_artifacts: Path) -> None:
    if stderr == TRT_MISSING:
        from engines.build import missing_requirements

        if not missing_requirements():
            pytest.skip("TensorRT is installed here: the engines folder's missing plans are what fails (GPU suite)")
    check_case(argv, code, stderr, tmp_path, {"ART": tiny_artifacts})
    assert not (tmp_path / "out.png").exists() and not list(tmp_path.glob(".out.png.*"))
