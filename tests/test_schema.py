"""The typed views of the on-disk formats (koala_core/schema.py and its users): each format's writer
and reader round-trip, and a missing key or a newer format_version is one exact error line naming
the file and the field, raised by the reader (never a KeyError later on)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from calibration.dataset import load_calibration
from calibration.manifest import FORMAT_VERSION as CALIB_VERSION
from calibration.manifest import write_calibration
from exporter.manifest import FORMAT_VERSION as ARTIFACTS_VERSION
from exporter.manifest import load_manifest, write_artifacts
from exporter.specs import ShapeRange, specs_from_configs
from koala_core.errors import UsageError
from koala_core.schema import FileRecord
from shipping.bundle import verify
from shipping.bundle_manifest import FORMAT_VERSION as BUNDLE_VERSION
from shipping.bundle_manifest import BundleProblem, bundle_json, parse_bundle

from conftest import run_cli

SHA = "ab" * 32


# ----- artifacts manifest ----------------------------------------------------------------------

def artifacts_doc() -> dict[str, Any]:
    from exporter.sources import resolve

    spec = specs_from_configs(resolve("random:tiny").configs)["unet"]
    rng = ShapeRange((1, 2, 2), (128, 128, 256), (128, 256, 256))
    return {"format": "koala-trt/artifacts", "format_version": ARTIFACTS_VERSION,
            "source": {"model": "random:tiny", "config_sha256": {"unet": SHA}},
            "components": {"unet": {"file": "unet/model.onnx", "precision": "fp16", "spec": spec.to_json(),
                                    "shape_range": rng.to_json(), "parameters": 7,
                                    "conversion": {"fp16_nodes": 3}}},
            "files": {"unet/model.onnx": {"sha256": SHA, "bytes": 3}},
            "tokenizers": ["tokenizer", "tokenizer_2"], "scheduler": "scheduler/scheduler_config.json",
            "sampler": {"steps": 25}, "opset": 18}


def test_artifacts_manifest_round_trips(tmp_path: Path) -> None:
    doc = artifacts_doc()
    write_artifacts(tmp_path, doc)
    assert json.loads((tmp_path / "manifest.json").read_text()) == doc
    m = load_manifest(tmp_path)
    c = m.record("unet")
    assert c.spec.to_json() == doc["components"]["unet"]["spec"]
    assert c.shape_range == ShapeRange((1, 2, 2), (128, 128, 256), (128, 256, 256))
    assert (c.file, c.precision, c.parameters, c.conversion, c.export) == ("unet/model.onnx", "fp16", 7, {"fp16_nodes": 3}, None)
    v = m.view
    assert v.files == {"unet/model.onnx": FileRecord(SHA, 3)}
    assert (v.source.model, v.source.config_sha256, v.tokenizers, v.opset) == ("random:tiny", {"unet": SHA},
                                                                               ("tokenizer", "tokenizer_2"), 18)
    m.save()  # the writer again: byte-identical document
    assert json.loads((tmp_path / "manifest.json").read_text()) == doc


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["components"]["unet"].pop("file"), "components.unet.file"),
    (lambda d: d["files"]["unet/model.onnx"].pop("sha256"), "files.unet/model.onnx.sha256"),
    (lambda d: d["source"].pop("model"), "source.model"),
    (lambda d: d.pop("scheduler"), "scheduler"),
])
def test_artifacts_manifest_missing_key_names_file_and_field(tmp_path: Path, edit: Any, field: str) -> None:
    doc = artifacts_doc()
    edit(doc)
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError) as e:
        load_manifest(tmp_path)
    assert str(e.value) == f"{tmp_path}/manifest.json: field {field} is required"
    with pytest.raises(UsageError):  # the writer refuses what the reader would refuse
        write_artifacts(tmp_path / "w", doc)
    assert not (tmp_path / "w").exists()


def test_artifacts_manifest_newer_format_version_is_one_error_line(tmp_path: Path) -> None:
    doc = artifacts_doc()
    doc["format_version"] = ARTIFACTS_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    code, out, err = run_cli("pack", "--artifacts", tmp_path, "--out", tmp_path / "b.tar.gz")
    assert (code, out) == (2, "")
    assert err == (f"Error: {tmp_path}/manifest.json: field format_version is {ARTIFACTS_VERSION + 1}: written by a "
                   f"newer koala-trt (this one reads koala-trt/artifacts up to version {ARTIFACTS_VERSION}); upgrade koala-trt\n")
    assert not (tmp_path / "b.tar.gz").exists()


def test_artifacts_manifest_malformed_spec_names_the_field(tmp_path: Path) -> None:
    doc = artifacts_doc()
    del doc["components"]["unet"]["spec"]["inputs"]
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError) as e:
        load_manifest(tmp_path)
    assert str(e.value) == f"{tmp_path}/manifest.json: field components.unet.spec is malformed (KeyError: 'inputs')"


# ----- calibration manifest --------------------------------------------------------------------

def calibration_doc() -> dict[str, Any]:
    settings = {"model": "random:tiny", "config_sha256": {"unet": SHA}, "height": 128, "width": 128, "steps": 2,
                "guidance": 5.0, "seed": 0, "prompts": ["a fox"]}
    shard = {"file": "shard-00000.npz", "prompt_index": 0, "prompt": "a fox", "seed": 0, "timesteps": [999.0, 499.0],
             "shapes": {"sample": [2, 2, 4, 16, 16]}, "sha256": SHA, "bytes": 10, "seconds": 1.5}
    return {"format": "koala-trt/calibration", "format_version": CALIB_VERSION, "settings": settings, "shards": [shard]}


def test_calibration_manifest_round_trips(tmp_path: Path) -> None:
    doc = calibration_doc()
    write_calibration(tmp_path, doc)
    assert json.loads((tmp_path / "manifest.json").read_text()) == doc
    cs = load_calibration(tmp_path)
    v = cs.view
    assert v.settings.prompts == ("a fox",) and v.settings.guidance == 5.0 and v.settings.config_sha256 == {"unet": SHA}
    (s,) = v.shards
    assert (s.file, s.prompt_index, s.timesteps, s.shapes, s.sha256, s.bytes) == (
        "shard-00000.npz", 0, (999.0, 499.0), {"sample": (2, 2, 4, 16, 16)}, SHA, 10)
    assert cs.complete and cs.num_samples == 2
    cs.save()
    assert json.loads((tmp_path / "manifest.json").read_text()) == doc


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["shards"][0].pop("sha256"), "shards[0].sha256"),
    (lambda d: d["settings"].pop("prompts"), "settings.prompts"),
    (lambda d: d.pop("format_version"), "format_version"),
])
def test_calibration_manifest_missing_key_is_one_error_line(tmp_path: Path, edit: Any, field: str) -> None:
    doc = calibration_doc()
    edit(doc)
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError) as e:
        load_calibration(tmp_path)
    assert str(e.value) == f"{tmp_path}/manifest.json: field {field} is required"


def test_calibration_manifest_newer_format_version_is_refused(tmp_path: Path) -> None:
    doc = calibration_doc()
    doc["format_version"] = CALIB_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError) as e:
        load_calibration(tmp_path)
    assert str(e.value) == (f"{tmp_path}/manifest.json: field format_version is {CALIB_VERSION + 1}: written by a newer "
                            f"koala-trt (this one reads koala-trt/calibration up to version {CALIB_VERSION}); upgrade koala-trt")


# ----- bundle.json -----------------------------------------------------------------------------

def bundle_doc() -> dict[str, Any]:
    return {"format": "koala-trt/bundle", "format_version": BUNDLE_VERSION, "created": "2026-12-02T00:00:00Z",
            "source": {"model": "random:tiny", "artifacts_manifest_sha256": SHA},
            "requirements": {"backend": "tensorrt",
                             "components": {"unet": {"backend": "tensorrt", "precision": "fp16", "file": "engines/unet.plan"}},
                             "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0"}, "tensorrt_version": "10.8.0.43"},
            "omitted": ["unet/model.onnx"],
            "files": {"manifest.json": {"sha256": SHA, "bytes": 5}, "engines/unet.plan": {"sha256": SHA, "bytes": 9}}}


def test_bundle_json_round_trips() -> None:
    doc = bundle_doc()
    raw = bundle_json(doc)
    assert json.loads(raw) == doc
    v = parse_bundle(raw, "b.tar.gz: bundle.json")
    assert v.format_version == BUNDLE_VERSION and v.omitted == ("unet/model.onnx",)
    assert v.files == {"manifest.json": FileRecord(SHA, 5), "engines/unet.plan": FileRecord(SHA, 9)}
    r = v.requirements
    assert (r.backend, r.tensorrt_version, r.gpu) == ("tensorrt", "10.8.0.43", {"name": "NVIDIA H200", "compute_capability": "9.0"})
    assert r.components["unet"].file == "engines/unet.plan" and r.doc == doc["requirements"]


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["requirements"].pop("tensorrt_version"), "requirements.tensorrt_version"),
    (lambda d: d["requirements"]["gpu"].pop("compute_capability"), "requirements.gpu.compute_capability"),
    (lambda d: d["files"]["manifest.json"].pop("bytes"), "files.manifest.json.bytes"),
    (lambda d: d.pop("requirements"), "requirements"),
])
def test_bundle_json_missing_key_names_file_and_field(tmp_path: Path, edit: Any, field: str) -> None:
    doc = bundle_doc()
    edit(doc)
    (tmp_path / "bundle.json").write_text(json.dumps(doc))
    report = verify(tmp_path, device_check=False)
    assert not report.ok
    assert report.problem == f"{tmp_path}: bundle.json: field {field} is required"
    with pytest.raises(BundleProblem):
        bundle_json(doc)


def test_bundle_json_newer_format_version_is_one_error_line(tmp_path: Path) -> None:
    doc = bundle_doc()
    doc["format_version"] = BUNDLE_VERSION + 1
    (tmp_path / "bundle.json").write_text(json.dumps(doc))
    code, out, err = run_cli("verify", tmp_path, "--no-device-check")
    problem = (f"{tmp_path}: bundle.json: field format_version is {BUNDLE_VERSION + 1}: written by a newer koala-trt "
               f"(this one reads koala-trt/bundle up to version {BUNDLE_VERSION}); upgrade koala-trt")
    assert verify(tmp_path, device_check=False).problem == problem
    assert (code, out) == (1, "")
    assert err == f"Error: {problem}\n"  # the problem names the bundle once (not twice, as it did)
