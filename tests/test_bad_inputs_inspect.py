"""Bad inputs of `koala-trt inspect`: exact exit code and error line, no traceback.

inspect shows what a manifest records and reads no graph, so a folder whose graphs are damaged is
refused by the commands that read them (tests/test_bad_inputs_generate.py), not here."""

from __future__ import annotations

from pathlib import Path

import pytest

from bad_inputs import check_case

CASES = [
    ("missing", ["inspect", "{T}/nothing"], 2,
     "Error: model '{T}/nothing' not found: not a folder, not a hub id, not a preset (try random:tiny)"),
    ("unknown-preset", ["inspect", "random:nosuch"], 2,
     "Error: unknown preset 'random:nosuch'; built-in presets: random:koala-700m, random:koala-1b, "
     "random:koala-lightning-700m, random:sdxl-base, random:tiny, random:tiny-sdxl, random:tiny-inpaint"),
    ("a-file", ["inspect", "{FILE}"], 2, "Error: model path {FILE} is not a folder"),
    ("empty-folder", ["inspect", "{EMPTY}"], 2, "Error: {EMPTY} is not a diffusers model folder (no model_index.json)"),
    ("manifest-invalid-json", ["inspect", "{BADJSON}"], 2,
     "Error: {BADJSON}/manifest.json is corrupt: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("manifest-cut-off", ["inspect", "{HALFMANIFEST}"], 2,
     "Error: {HALFMANIFEST}/manifest.json is corrupt: Unterminated string starting at: line 8 column 20 (char 180)"),
    ("manifest-no-keys", ["inspect", "{NOKEYS}"], 2, "Error: {NOKEYS}/manifest.json is not a koala-trt artifacts manifest (format None)"),
    # an engines folder is inspected (tests/test_lora_engines.py); an incomplete one is refused by the engines reader
    ("engines-folder-incomplete", ["inspect", "{ENGNOSPEC}"], 2,
     "Error: {ENGNOSPEC}/manifest.json is not a complete engines manifest: engines.unet has no 'spec' "
     "(rebuild with `koala-trt build`)"),
    ("extra-argument", ["inspect", "random:tiny", "extra"], 2, "Error: Got unexpected extra argument (extra)"),
]


@pytest.mark.parametrize("argv,code,stderr", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_inspect_refuses(argv: list[str], code: int, stderr: str, tmp_path: Path, tiny_artifacts: Path) -> None:
    check_case(argv, code, stderr, tmp_path, {"ART": tiny_artifacts})

