"""Shared helpers for the engines tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def relabelled_copy(src: Path, dst: Path, precisions: dict[str, str]) -> Path:
    """A copy of an artifacts folder whose manifest *records* other precisions. LABELLED TEST DATA: the
    graphs stay FP32; only the manifest's per-component "precision" field changes, which is all the
    build plan reads to pick a folder (real FP16/INT8 folders come from `koala-trt convert/quantize`)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for name, precision in precisions.items():
        m["components"][name]["precision"] = precision
    m["test_label"] = "relabelled copy: graphs are fp32, precision fields edited by the test"
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return dst
