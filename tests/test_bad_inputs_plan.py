"""Bad inputs of `koala-trt plan`, `build` and `profiles`: exact exit code and error line, before any
tracing, any build, and before the machine's TensorRT is even looked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from bad_inputs import check_case, staging_leftovers

RANGE = "Error: Invalid value for '{flag}': {v} is not in the range x>=1."
PLAN = ["plan", "--model", "random:tiny", "--profile", "rtx4090"]
# --dry-run at random:tiny's exported range (128..512 px), so only the bad input can fail
DRY_ON = ["build", "--profile", "rtx4090", "--out", "{T}/out", "--dry-run", "--precision", "fp32", "--height", "256",
          "--width", "256", "--onnx"]
DRY = [*DRY_ON, "{ART}"]
BUILD = ["build", "--onnx", "{ART}", "--profile", "rtx4090", "--precision", "fp32", "--height", "256", "--width", "256"]
NOT_TOML = "Error: {FILE} is not valid TOML (Expected '=' after a key in a key/value pair (at line 1, column 5))"
UNKNOWN_PROFILE = ("Error: unknown GPU profile 'nosuch'; built-in profiles: a10, a100-40gb, a100-80gb, h100-80gb, "
                   "jetson-agx-orin, l4, rtx-portable, rtx2080ti, rtx3060ti, rtx4090, rtx5090 (or pass the path of your own .toml)")

CASES = [
    # --- plan (had no bad-input test before)
    ("plan-batch-0", [*PLAN, "--batch", "0"], 2, RANGE.format(flag="--batch", v=0)),
    ("plan-batch-negative", [*PLAN, "--batch", "-2"], 2, RANGE.format(flag="--batch", v=-2)),
    ("plan-height-negative-multiple", [*PLAN, "--height", "-256"], 2, RANGE.format(flag="--height", v=-256)),
    ("plan-width-0", [*PLAN, "--width", "0"], 2, RANGE.format(flag="--width", v=0)),
    ("plan-height-not-a-multiple", [*PLAN, "--height", "100"], 2, "Error: unet: height and width must be multiples of 32 (got 100x1024)"),
    ("plan-width-not-a-multiple", [*PLAN, "--width", "1000"], 2, "Error: unet: height and width must be multiples of 32 (got 1024x1000)"),
    ("plan-precision-unknown", [*PLAN, "--precision", "int4"], 2,
     "Error: Invalid value for '--precision': 'int4' is not one of 'fp32', 'fp16', 'int8', 'int8-wo', 'fp8'."),
    ("plan-profile-unknown", ["plan", "--model", "random:tiny", "--profile", "nosuch"], 2, UNKNOWN_PROFILE),
    ("plan-profile-missing", ["plan", "--model", "random:tiny", "--profile", "{T}/nothing.toml"], 2,
     "Error: profile file {T}/nothing.toml does not exist"),
    ("plan-profile-is-a-folder", ["plan", "--model", "random:tiny", "--profile", "{EMPTY}"], 2,
     "Error: profile file {EMPTY} is not a file (a GPU profile is one .toml file)"),
    ("plan-profile-not-toml", ["plan", "--model", "random:tiny", "--profile", "{FILE}"], 2, NOT_TOML),
    ("plan-model-missing", ["plan", "--model", "{T}/nothing", "--profile", "rtx4090"], 2,
     "Error: model '{T}/nothing' not found: not a folder, not a hub id, not a preset (try random:tiny)"),
    ("plan-model-is-artifacts", ["plan", "--model", "{ART}", "--profile", "rtx4090"], 2,
     "Error: {ART} is not a diffusers model folder (no model_index.json)"),
    ("plan-vae-tile-not-a-multiple", [*PLAN, "--vae-tile", "500"], 2, "Error: --vae-tile must be a positive multiple of 8 px (got 500)"),
    ("plan-vae-tile-larger-than-the-image", [*PLAN, "--vae-tile", "2048"], 2,
     "Error: --vae-tile 2048 px is larger than the image (1024x1024 px, the smallest the profile allows); use a tile of at most 1024 px"),
    ("plan-vae-tile-0", [*PLAN, "--vae-tile", "0"], 2, "Error: --vae-tile must be a positive multiple of 8 px (got 0)"),
    ("plan-fp8-below-sm89", ["plan", "--model", "random:tiny", "--profile", "rtx3060ti", "--precision", "fp8"], 2,
     "Error: fp8 needs sm_89 or newer; rtx3060ti is sm_86"),
    ("plan-int8-wo-on-turing", ["plan", "--model", "random:tiny", "--profile", "rtx2080ti", "--precision", "int8-wo"], 2,
     "Error: int8-wo needs sm_80 or newer; rtx2080ti is sm_75"),
    ("plan-budget-larger-than-the-card", [*PLAN, "--weight-streaming-budget", "30"], 2,
     "Error: --weight-streaming-budget 30 GiB is larger than the card: rtx4090 has 23.5 GiB usable (24 GiB - 0.5 GiB reserved)"),
    ("plan-budget-negative", [*PLAN, "--weight-streaming-budget", "-1"], 2,
     "Error: --weight-streaming-budget must be a number of GiB, at least 0 (got -1.0)"),
    ("plan-min-margin-negative", [*PLAN, "--min-margin", "-1"], 2,
     "Error: Invalid value for '--min-margin': -1.0 is not in the range x>=0."),
    # --- build --dry-run: every input it reads
    ("build-vae-tile-larger-than-the-image", [*DRY, "--vae-tile", "512"], 2,
     "Error: --vae-tile 512 px is larger than the image (256x256 px, the smallest the profile allows); use a tile of at most 256 px"),
    ("build-budget-larger-than-the-card", [*DRY, "--weight-streaming-budget", "24"], 2,
     "Error: --weight-streaming-budget 24 GiB is larger than the card: rtx4090 has 23.5 GiB usable (24 GiB - 0.5 GiB reserved)"),
    ("build-auto-without-the-estimate", [*DRY, "--auto", "--no-estimate"], 2,
     "Error: --auto takes the memory plan's choice: drop --no-estimate"),
    ("build-batch-0", [*DRY, "--batch", "0"], 2, RANGE.format(flag="--batch", v=0)),
    ("build-height-negative", [*DRY, "--height", "-8"], 2, RANGE.format(flag="--height", v=-8)),
    ("build-height-below-export-range", [*DRY, "--height", "96"], 2,
     "Error: unet: input sample needs height 96 px, outside the range its export recorded (height 128..512 px, {ART}): "
     "the limit is at least 128 px; set --height within it, or re-export at a size whose range covers it"),
    ("build-unknown-component", [*DRY, "-c", "unet,nope"], 2,
     "Error: unknown component 'nope'; expected one of text_encoder, text_encoder_2, unet, vae_decoder, vae_encoder, unet_deep, unet_shallow, controlnet, unet_controlnet"),
    ("build-profile-not-toml", [*DRY, "--profile", "{FILE}"], 2, NOT_TOML),
    ("build-onnx-missing", [*DRY_ON, "{T}/nothing"], 2, "Error: artifacts folder {T}/nothing does not exist"),
    ("build-onnx-empty", [*DRY_ON, "{EMPTY}"], 2,
     "Error: {EMPTY} is not a koala-trt artifacts folder (no manifest.json); create one with `koala-trt export`"),
    ("build-onnx-manifest-invalid-json", [*DRY_ON, "{BADJSON}"], 2,
     "Error: {BADJSON}/manifest.json is corrupt: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("build-onnx-manifest-cut-off", [*DRY_ON, "{HALFMANIFEST}"], 2,
     "Error: {HALFMANIFEST}/manifest.json is corrupt: Unterminated string starting at: line 8 column 20 (char 180)"),
    ("build-onnx-manifest-no-keys", [*DRY_ON, "{NOKEYS}"], 2,
     "Error: {NOKEYS}/manifest.json is not a koala-trt artifacts manifest (format None)"),
    ("build-onnx-is-an-engines-folder", [*DRY_ON, "{ENG}"], 2,
     "Error: {ENG}/manifest.json is not a koala-trt artifacts manifest (format 'koala-trt/engines')"),
    ("build-onnx-graph-missing", [*DRY_ON, "{NOGRAPH}"], 2, "Error: missing artifact file {NOGRAPH}/unet/model.onnx"),
    ("build-onnx-graph-truncated", [*DRY_ON, "{TRUNC}"], 2,
     "Error: {TRUNC}/unet/model.onnx is corrupt: {UNET_HALF:,} bytes, the manifest records {UNET_BYTES:,}"),
    # --- build proper: its output is checked before the machine's requirements
    ("build-out-exists", [*BUILD, "--out", "{DIR}"], 2, "Error: {DIR} already exists; pass --force to replace it"),
    ("build-out-is-a-file", [*BUILD, "--out", "{FILE}", "--force"], 2, "Error: --out {FILE} is a file; give a folder name"),
    ("build-out-unwritable", [*BUILD, "--out", "{FILE}/out"], 2, "Error: cannot write {FILE}/out: {FILE} is not a writable folder"),
    # --- profiles
    ("profiles-show-unknown", ["profiles", "show", "nosuch"], 2, UNKNOWN_PROFILE),
    ("profiles-show-missing", ["profiles", "show", "{T}/nothing.toml"], 2, "Error: profile file {T}/nothing.toml does not exist"),
    ("profiles-show-not-toml", ["profiles", "show", "{FILE}"], 2, NOT_TOML),
    ("profiles-unknown-subcommand", ["profiles", "nope"], 2, "Error: No such command 'nope'."),
]


@pytest.mark.parametrize("argv,code,stderr", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_build_profiles_refuse(argv: list[str], code: int, stderr: str, tmp_path: Path, tiny_artifacts: Path) -> None:
    check_case(argv, code, stderr, tmp_path, {"ART": tiny_artifacts})
    assert not (tmp_path / "out").exists() and not staging_leftovers(tmp_path / "out")

