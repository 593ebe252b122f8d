"""Shared helpers for the engines tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engines.cuda import DeviceInfo


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


def fake_engines_dir(tiny_artifacts: Path, out: Path, profile: str = "rtx4090", device: DeviceInfo | None = None,
                     trt: str = "10.8.0.43", library: str = "tensorrt", **build: object) -> Path:
    """An engines folder's manifest as a build of random:tiny on `device` (default an RTX 4090, with
    standard TensorRT unless `library` says otherwise) would write it, composed by the functions
    `koala-trt build` uses. LABELLED TEST DATA: no plan files."""
    from engines.build import compose_manifest, engine_entry
    from engines.buildplan import make_build_plan
    from engines.profile import load_profile

    device = device or DeviceInfo("NVIDIA GeForce RTX 4090", "8.9", 24 << 30, "12.8", "12.6")
    prof = load_profile(profile).with_library(library).with_overrides(height=256, width=256, precision="fp32")
    if build:
        from dataclasses import replace

        prof = replace(prof, build=replace(prof.build, **build))
    args = {"onnx": [str(tiny_artifacts.resolve())], "profile": profile, "precision": "fp32", "height": 256, "width": 256}
    plan = make_build_plan([tiny_artifacts], prof, out, None, trt, estimate=False, args=args)
    engines = {n: engine_entry(c, 0, "0" * 64, 1 << 20, 1, {t.name: t.dtype for t in (*c.spec.inputs, *c.spec.outputs)},
                               0.0, stripped=prof.build.refit == "identical")
               for n, c in plan.components.items()}
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps(compose_manifest(plan, device, trt, engines, 0.0)))
    return out
