"""Bad inputs of `koala-trt export`: exact exit code and one-line error, before any model work; an
interrupted export leaves nothing at OUT."""

from __future__ import annotations

from pathlib import Path

import pytest

from bad_inputs import check_case, run_and_terminate, staging_leftovers

RANGE = "Error: Invalid value for '{flag}': {v} is not in the range x>=1."
EXPORT = ["export", "--model", "random:tiny", "--out", "{T}/out"]

CASES = [
    ("batch-0", [*EXPORT, "--batch", "0"], 2, RANGE.format(flag="--batch", v=0)),
    ("cache-branch-the-unet-lacks", [*EXPORT, "--cache-branch", "2"], 2,
     "Error: --cache-branch 2: this U-Net has branches 0, 1, 3, 4, 6, 7 (3 up blocks of 2, 2, 2 layers; "
     "branch = 3 x block + layer, as DeepCache numbers them)"),
    ("cache-branch-negative", [*EXPORT, "--cache-branch", "-1"], 2,
     "Error: --cache-branch -1: this U-Net has branches 0, 1, 3, 4, 6, 7 (3 up blocks of 2, 2, 2 layers; "
     "branch = 3 x block + layer, as DeepCache numbers them)"),
    ("batch-negative", [*EXPORT, "--batch", "-1"], 2, RANGE.format(flag="--batch", v=-1)),
    ("height-0", [*EXPORT, "--height", "0"], 2, RANGE.format(flag="--height", v=0)),
    ("height-negative-multiple", [*EXPORT, "--height", "-256"], 2, RANGE.format(flag="--height", v=-256)),
    ("width-negative", [*EXPORT, "--width", "-32"], 2, RANGE.format(flag="--width", v=-32)),
    ("check-size-0", [*EXPORT, "--check-size", "0"], 2, RANGE.format(flag="--check-size", v=0)),
    ("opset-0", [*EXPORT, "--opset", "0"], 2, RANGE.format(flag="--opset", v=0)),
    ("height-not-a-multiple", [*EXPORT, "--height", "100"], 2,
     "Error: unet: height and width must be multiples of 32 (got 100x256)"),
    ("unknown-component", [*EXPORT, "-c", "unet,nosuch"], 2,
     "Error: unknown component 'nosuch'; expected one of text_encoder, text_encoder_2, unet, vae_decoder, vae_encoder, unet_deep, unet_shallow, controlnet, unet_controlnet"),
    ("out-exists", ["export", "--model", "random:tiny", "--out", "{ART}"], 2,
     "Error: {ART} already exists; pass --force to replace it"),
    ("out-is-a-file", ["export", "--model", "random:tiny", "--out", "{FILE}"], 2,
     "Error: {FILE} already exists; pass --force to replace it"),
    ("out-is-a-file-with-force", ["export", "--model", "random:tiny", "--out", "{FILE}", "--force"], 2,
     "Error: --out {FILE} is a file; give a folder name"),
    ("out-unwritable", ["export", "--model", "random:tiny", "--out", "{FILE}/out"], 2,
     "Error: cannot write {FILE}/out: {FILE} is not a writable folder"),
    ("model-missing", ["export", "--model", "{T}/nothing", "--out", "{T}/out"], 2,
     "Error: model '{T}/nothing' not found: not a folder, not a hub id, not a preset (try random:tiny)"),
    ("model-empty-folder", ["export", "--model", "{EMPTY}", "--out", "{T}/out"], 2,
     "Error: {EMPTY} is not a diffusers model folder (no model_index.json)"),
    ("model-is-artifacts", ["export", "--model", "{ART}", "--out", "{T}/out"], 2,
     "Error: {ART} is not a diffusers model folder (no model_index.json)"),
    ("vae-missing", [*EXPORT, "--vae", "{T}/novae"], 2,
     "Error: --vae {T}/novae: not an AutoencoderKL folder (no config.json)"),
    ("vae-empty-folder", [*EXPORT, "--vae", "{EMPTY}"], 2,
     "Error: --vae {EMPTY}: not an AutoencoderKL folder (no config.json)"),
]


@pytest.mark.parametrize("argv,code,stderr", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_export_refuses(argv: list[str], code: int, stderr: str, tmp_path: Path, tiny_artifacts: Path) -> None:
    check_case(argv, code, stderr, tmp_path, {"ART": tiny_artifacts})
    assert not (tmp_path / "out").exists() and not staging_leftovers(tmp_path / "out")


def test_interrupted_export_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM once the first graph is on disk in the staging folder: OUT never appears, the staging
    folder is gone, and the command says so (exit 130)."""
    out = tmp_path / "tiny"

    def writing() -> bool:
        return any(tmp_path.glob(".tiny.partial-*/*/*.onnx"))

    code, err = run_and_terminate(["export", "--model", "random:tiny", "--out", str(out)], out, writing)
    assert err.strip().splitlines()[-1] == "Interrupted: nothing was left half-written.", err
    assert code == 130
    assert not out.exists()
    assert staging_leftovers(out) == []
