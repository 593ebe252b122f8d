"""Precision variants as complete artifact folders: copy the FP32 folder, replace the converted
components' graphs, record their precision in the manifest and re-hash every file."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from exporter.manifest import MANIFEST, Manifest, load_manifest
from koala_core.errors import KoalaError, UsageError

TWO_GB = 2 * 1024**3
ACCURACY = "accuracy.json"


def load_fp32_source(onnx_dir: Path) -> Manifest:
    """The artifacts folder a variant is made from: intact, and FP32 in every component."""
    m = load_manifest(onnx_dir)
    problems = list(m.verify())
    if problems:
        raise UsageError(f"{onnx_dir}: {problems[0]}" + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    not_fp32 = [n for n in m.components if m.precision(n) != "fp32"]
    if not_fp32:
        raise UsageError(f"{onnx_dir} is already a precision variant ({', '.join(f'{n}: {m.precision(n)}' for n in not_fp32)}); "
                         "convert or quantize the FP32 export instead")
    return m


def copy_artifacts(src: Manifest, stage: Path, skip: Iterable[str] = ()) -> Manifest:
    """Copy every file of `src` (components, tokenizers, scheduler) into `stage`, but those of the
    components in `skip` (their graphs are to be written afresh); the manifest is copied as data, to
    be updated and saved by the caller."""
    import copy

    skipped = {str(Path(src.record(n).file).parent) + "/" for n in skip}
    for rel in src.view.files:
        if rel == ACCURACY or any(rel.startswith(d) for d in skipped):
            continue
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src.root / rel, dst)
    data = copy.deepcopy(src.data)
    data.pop("accuracy", None)
    return Manifest(stage, data)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (same filesystem), else copy it. Not a symlink: ONNX Runtime refuses
    external data that resolves outside the model's folder (onnx.load refuses hard links too, so
    this is only for graphs ONNX Runtime alone reads)."""
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_onnx(model: Any, path: Path) -> None:
    """Write `model` to `path` (replacing the component's old graph and weights), with external
    data in model.onnx.data only when the protobuf would pass 2 GB."""
    import onnx

    for old in path.parent.glob("*"):
        if old.is_file():
            old.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size >= TWO_GB - (64 << 20):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def graph_io_types(path: Path) -> dict[str, str]:
    """name -> numpy dtype name of every graph input and output (read without loading weights)."""
    import onnx
    from onnx import helper

    g = onnx.load(str(path), load_external_data=False).graph
    return {v.name: helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name for v in [*g.input, *g.output]}


def check_io_types(manifest: Manifest, name: str) -> None:
    """Graph inputs and outputs must keep the dtypes the manifest's spec records."""
    spec = manifest.spec(name)
    got = graph_io_types(manifest.onnx_path(name))
    bad = [f"{t.name} is {got.get(t.name)}, spec says {t.dtype}" for t in (*spec.inputs, *spec.outputs) if got.get(t.name) != t.dtype]
    if bad:
        raise KoalaError(f"{name}: the converted graph changed its interface ({'; '.join(bad)})")


Check = Callable[[Path], dict[str, Any]]


def finish(manifest: Manifest, variant: dict[str, Any], check: Check | None = None,
           on_report: Callable[[dict[str, Any]], None] | None = None, gate: bool = True) -> dict[str, Any] | None:
    """Record the variant, hash every file and save the manifest; then write accuracy.json (from
    `check`, run on the staged folder as `koala-trt validate` reads it) and add it to the manifest.
    A failed accuracy gate raises after `on_report` has seen the report, so the staged folder is
    removed and nothing half-trusted is left."""
    from exporter.manifest import file_record
    from koala_core.errors import CheckFailed
    from koala_core.jsonfile import write_json

    manifest.data["variant"] = variant
    manifest.rehash()
    manifest.save()
    report = None
    if check is not None:
        report = check(manifest.root)
        write_json(manifest.root / ACCURACY, report)
        manifest.data["files"][ACCURACY] = file_record(manifest.root / ACCURACY)
        manifest.data["accuracy"] = {"file": ACCURACY, "passed": report["passed"]}
        manifest.save()
        if on_report:
            on_report(report)
        if gate and not report["passed"]:
            raise CheckFailed("accuracy gate failed: " + "; ".join(report["failure_summary"]))
    return report


@contextlib.contextmanager
def quiet_library(level: int = logging.ERROR) -> Iterator[None]:
    """Keep stdout for results: library chatter (ModelOpt, Polygraphy, ONNX Runtime) goes to stderr
    and only from warnings up."""
    names = ("modelopt", "modelopt.onnx", "modelopt.onnx.autocast", "Polygraphy", "onnxruntime", "root")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(level)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for n, lv in old.items():
            logging.getLogger(n).setLevel(lv)


__all__ = ["ACCURACY", "MANIFEST", "copy_artifacts", "save_onnx", "graph_io_types", "check_io_types", "finish",
           "load_fp32_source", "quiet_library"]
