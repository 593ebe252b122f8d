"""Bad inputs of `koala-trt pack`, `unpack`, `verify` and `triton`: exact exit code and error line, checked
before anything is written (no archive, no folder, no staging leftovers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bad_inputs import check_case, expand, staging_leftovers
from conftest import run_cli

RANGE = "Error: Invalid value for '{flag}': {v} is not in the range x>=1."
PACK = ["pack", "--artifacts", "{ART}", "--out", "{T}/out"]
TRITON = ["triton", "--artifacts", "{ART}", "--out", "{T}/out"]
HALF = "Error: {HALFMANIFEST}/manifest.json is corrupt: Unterminated string starting at: line 8 column 20 (char 180)"
BAD_JSON = "Error: {BADJSON}/manifest.json is corrupt: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
ENG_BAD_JSON = "Error: {ENGBADJSON}/manifest.json is corrupt: Expecting ',' delimiter: line 1 column 6 (char 5)"
NO_PLANS = "Error: {ENG} is incomplete: engine text_encoder.fp32.b1-2-2.sm89.trt10.8.0.43.plan of text_encoder is missing"
CUT_PLAN = ("Error: {ENGCUTPLAN}/unet.fp32.b2.256x256.sm89.trt10.8.0.43.plan has 100 bytes, the engines manifest says 3072 "
            "(changed or corrupt)")

CASES = [
    # --- pack
    ("pack-level-negative", [*PACK, "--level", "-1"], 2, "Error: Invalid value for '--level': -1 is not in the range 0<=x<=9."),
    ("pack-level-10", [*PACK, "--level", "10"], 2, "Error: Invalid value for '--level': 10 is not in the range 0<=x<=9."),
    ("pack-out-exists", ["pack", "--artifacts", "{ART}", "--out", "{FILE}"], 2, "Error: {FILE} already exists; pass --force to replace it"),
    ("pack-out-is-a-folder", ["pack", "--artifacts", "{ART}", "--out", "{DIR}"], 2, "Error: --out {DIR} is a folder; give a file name"),
    ("pack-out-unwritable", ["pack", "--artifacts", "{ART}", "--out", "{FILE}/b.tar.gz"], 2,
     "Error: cannot write {FILE}/b.tar.gz: {FILE} is not a writable folder"),
    ("pack-artifacts-missing", ["pack", "--artifacts", "{T}/nothing", "--out", "{T}/out"], 2,
     "Error: artifacts folder {T}/nothing does not exist"),
    ("pack-artifacts-empty", ["pack", "--artifacts", "{EMPTY}", "--out", "{T}/out"], 2,
     "Error: {EMPTY} is not a koala-trt artifacts folder (no manifest.json); create one with `koala-trt export`"),
    ("pack-artifacts-manifest-invalid-json", ["pack", "--artifacts", "{BADJSON}", "--out", "{T}/out"], 2, BAD_JSON),
    ("pack-artifacts-manifest-cut-off", ["pack", "--artifacts", "{HALFMANIFEST}", "--out", "{T}/out"], 2, HALF),
    ("pack-artifacts-manifest-no-keys", ["pack", "--artifacts", "{NOKEYS}", "--out", "{T}/out"], 2,
     "Error: {NOKEYS}/manifest.json is not a koala-trt artifacts manifest (format None)"),
    ("pack-graph-truncated", ["pack", "--artifacts", "{TRUNC}", "--out", "{T}/out"], 2,
     "Error: {TRUNC}/unet/model.onnx has {UNET_HALF} bytes, manifest.json says {UNET_BYTES} (changed or corrupt)"),
    ("pack-graph-missing", ["pack", "--artifacts", "{NOGRAPH}", "--out", "{T}/out"], 2,
     "Error: {NOGRAPH} is incomplete: unet/model.onnx (listed in manifest.json) is missing"),
    ("pack-engines-missing", [*PACK, "--engines", "{T}/nothing"], 2, "Error: engines folder {T}/nothing does not exist"),
    ("pack-engines-is-artifacts", [*PACK, "--engines", "{ART}"], 2,
     "Error: {ART}/manifest.json is not a koala-trt engines manifest (format 'koala-trt/artifacts')"),
    ("pack-engines-manifest-invalid-json", [*PACK, "--engines", "{ENGBADJSON}"], 2, ENG_BAD_JSON),
    ("pack-engines-without-plans", [*PACK, "--engines", "{ENG}"], 2, NO_PLANS),
    ("pack-engines-plan-cut-short", [*PACK, "--engines", "{ENGCUTPLAN}"], 2, CUT_PLAN),
    # --- unpack
    ("unpack-bundle-missing", ["unpack", "{T}/nothing.tar.gz", "--out", "{T}/out"], 2, "Error: {T}/nothing.tar.gz does not exist"),
    ("unpack-bundle-is-a-folder", ["unpack", "{EMPTY}", "--out", "{T}/out"], 2, "Error: {EMPTY} is not a file"),
    ("unpack-bundle-not-an-archive", ["unpack", "{FILE}", "--out", "{T}/out"], 1, "Error: {FILE} is truncated or corrupt: truncated header"),
    ("unpack-out-exists", ["unpack", "{FILE}", "--out", "{DIR}"], 2, "Error: {DIR} already exists; pass --force to replace it"),
    ("unpack-out-unwritable", ["unpack", "{FILE}", "--out", "{FILE}/u"], 2, "Error: cannot write {FILE}/u: {FILE} is not a writable folder"),
    # --- verify
    ("verify-missing", ["verify", "{T}/nothing"], 2, "Error: {T}/nothing does not exist"),
    ("verify-not-an-archive", ["verify", "{FILE}"], 1, "Error: {FILE} is truncated or corrupt: truncated header"),
    ("verify-empty-folder", ["verify", "{EMPTY}"], 2, "Error: {EMPTY} is not a bundle: no bundle.json"),
    ("verify-artifacts-folder", ["verify", "{ART}"], 2,
     "Error: {ART} is not a bundle: no bundle.json (it is an artifacts folder; pack it with `koala-trt pack`)"),
    ("verify-engines-folder", ["verify", "{ENGPLANS}"], 2,
     "Error: {ENGPLANS} is not a bundle: no bundle.json (it is an engines folder; pack it with its artifacts: "
     "`koala-trt pack --artifacts DIR --engines DIR`)"),
    ("verify-bundle-json-invalid", ["verify", "{BUNDLEBADJSON}"], 1,
     "Error: {BUNDLEBADJSON}: bundle.json is corrupt (Expecting value: line 1 column 12 (char 11))"),
    ("verify-bundle-json-no-keys", ["verify", "{BUNDLENOKEYS}"], 1,
     "Error: {BUNDLENOKEYS}: bundle.json: field format is required"),
    # --- triton
    ("triton-max-batch-0", [*TRITON, "--max-batch", "0"], 2, RANGE.format(flag="--max-batch", v=0)),
    ("triton-instances-negative", [*TRITON, "--instances", "-1"], 2, RANGE.format(flag="--instances", v=-1)),
    ("triton-out-exists", ["triton", "--artifacts", "{ART}", "--out", "{DIR}"], 2, "Error: {DIR} already exists; pass --force to replace it"),
    ("triton-out-is-a-file", ["triton", "--artifacts", "{ART}", "--out", "{FILE}", "--force"], 2,
     "Error: --out {FILE} is a file; give a folder name"),
    ("triton-out-unwritable", ["triton", "--artifacts", "{ART}", "--out", "{FILE}/x"], 2,
     "Error: cannot write {FILE}/x: {FILE} is not a writable folder"),
    ("triton-artifacts-missing", ["triton", "--artifacts", "{T}/nothing", "--out", "{T}/out"], 2,
     "Error: artifacts folder {T}/nothing does not exist"),
    ("triton-artifacts-manifest-invalid-json", ["triton", "--artifacts", "{BADJSON}", "--out", "{T}/out"], 2, BAD_JSON),
    ("triton-artifacts-manifest-cut-off", ["triton", "--artifacts", "{HALFMANIFEST}", "--out", "{T}/out"], 2, HALF),
    ("triton-graph-missing", ["triton", "--artifacts", "{NOGRAPH}", "--out", "{T}/out"], 2,
     "Error: unet: unet/model.onnx is missing from {NOGRAPH} (a bundle packed with --no-graphs? pass its engines with --engines)"),
    ("triton-graph-truncated", ["triton", "--artifacts", "{TRUNC}", "--out", "{T}/out"], 2,
     "Error: {TRUNC}/unet/model.onnx has {UNET_HALF} bytes, its manifest records {UNET_BYTES} (changed or corrupt)"),
    ("triton-engines-missing", [*TRITON, "--engines", "{T}/nothing"], 2, "Error: engines folder {T}/nothing does not exist"),
    ("triton-engines-empty", [*TRITON, "--engines", "{EMPTY}"], 2,
     "Error: {EMPTY} is not a koala-trt engines folder (no manifest.json); create one with `koala-trt build`"),
    ("triton-engines-manifest-invalid-json", [*TRITON, "--engines", "{ENGBADJSON}"], 2, ENG_BAD_JSON),
    ("triton-engines-without-plans", [*TRITON, "--engines", "{ENG}"], 2, NO_PLANS),
    ("triton-engines-plan-cut-short", [*TRITON, "--engines", "{ENGCUTPLAN}"], 2, CUT_PLAN),
]


@pytest.mark.parametrize("argv,code,stderr", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_pack_unpack_verify_triton_refuse(argv: list[str], code: int, stderr: str, tmp_path: Path, tiny_artifacts: Path) -> None:
    check_case(argv, code, stderr, tmp_path, {"ART": tiny_artifacts})
    assert not (tmp_path / "out").exists() and not staging_leftovers(tmp_path / "out")


def test_verify_refuses_another_cards_engines(tmp_path: Path, tiny_artifacts: Path) -> None:
    """A bundle carrying engines built on an RTX 4090 (sm_89), archive and unpacked folder alike. The
    refusal names this machine's GPU, so the exact line is asserted where there is none (the CPU suite);
    tests/test_shipping.py covers a machine with another GPU."""
    from engines.compat import gather_facts

    if gather_facts().gpus:
        pytest.skip("this machine has a GPU: the line names it (tests/test_shipping.py covers that case)")
    fx = {"ART": tiny_artifacts}
    (b,) = expand(["{T}/b.tar.gz"], tmp_path, fx)
    code, _, err = run_cli(*expand(["pack", "--artifacts", "{ART}", "--engines", "{ENGPLANS}", "--out", b], tmp_path, fx))
    assert code == 0, err
    why = ("the bundle's engines cannot run here: built for NVIDIA GeForce RTX 4090 (sm_89), but no NVIDIA GPU found on "
           "this machine (nvidia-smi is not installed); use `verify --no-device-check` to check integrity only")
    check_case(["verify", b], 1, f"Error: {b}: {why}", tmp_path, fx)
    assert run_cli("unpack", b, "--out", tmp_path / "u")[0] == 0
    check_case(["verify", "{T}/u"], 1, f"Error: {tmp_path / 'u'}: {why}", tmp_path, fx)
