"""Bundles (pack / verify / unpack) and the Triton model repository, on the session's random:tiny export.

No Triton server runs here (no tritonserver binary, no container engine): the repository tests parse
every config.pbtxt with protobuf's text format against Triton's ModelConfig schema: the official one
(tritonclient's generated model_config_pb2, vendored under tests/data/triton/) and a minimal
descriptor of the fields we write.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

FAKE_PLAN_NOTE = "bytes standing in for a TensorRT plan: packing and verifying never parse plans"


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def last_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("Error:"), err
    assert "Traceback" not in err
    return lines[-1]


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "tiny.tar.gz"
    code, stdout, err = run_cli("pack", "--artifacts", tiny_artifacts, "--out", out, "--level", "1")
    assert code == 0, err
    assert f"sha256 {sha(out)}  tiny.tar.gz" in stdout
    return out


def engines_folder(root: Path, tiny_artifacts: Path, cc: str = "8.9", name: str = "NVIDIA GeForce RTX 4090") -> Path:
    """An engines folder as `koala-trt build` records it, for the unet; the plan is FAKE_PLAN_NOTE."""
    root.mkdir(parents=True)
    plan = root / "unet.fp32.sm89.plan"
    plan.write_bytes(FAKE_PLAN_NOTE.encode() * 1000)
    from engines_helpers import fake_engines_dir

    # the unet's spec, shape range and optimization profile as the build records them (static batch 2, 256 px)
    built = json.loads((fake_engines_dir(tiny_artifacts, root.parent / f".{root.name}-composed") / "manifest.json").read_text())
    runtime = {k: built["engines"]["unet"][k] for k in ("spec", "shape_range", "inputs")}
    data = {"format": "koala-trt/engines", "gpu": {"name": name, "compute_capability": cc},
            "tensorrt": "10.8.0.43", "cuda": {"runtime": "12.8"}, "source": {"artifacts": str(tiny_artifacts)},
            "engines": {"unet": {"file": plan.name, "sha256": sha(plan), "bytes": plan.stat().st_size, **runtime}}}
    (root / "manifest.json").write_text(json.dumps(data, indent=2))
    return root


def members(archive: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(archive, "r:gz") as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()]  # type: ignore[union-attr]


def write_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info = tarfile.TarInfo(info.name) if data is None and info.isreg() else info
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


# --------------------------------------------------------------------------------------------
# bundles
# --------------------------------------------------------------------------------------------
def test_pack_verify_unpack_round_trip(bundle: Path, tiny_artifacts: Path, tmp_path: Path) -> None:
    code, out, err = run_cli("verify", bundle)
    assert code == 0, err
    assert out.startswith(f"OK {bundle}: 11 files") and "ONNX Runtime" in out

    code, out, err = run_cli("unpack", bundle, "--out", tmp_path / "u")
    assert code == 0, err
    u = tmp_path / "u"
    src = json.loads((tiny_artifacts / "manifest.json").read_text())
    for rel in [*src["files"], "manifest.json"]:
        assert sha(u / rel) == sha(tiny_artifacts / rel), rel
    head = json.loads((u / "bundle.json").read_text())
    assert head["requirements"]["backend"] == "onnxruntime"
    assert head["requirements"]["components"]["unet"] == {"backend": "onnxruntime", "precision": "fp32", "file": "unet/model.onnx"}
    assert set(head["files"]) == {*src["files"], "manifest.json"}

    code, out, err = run_cli("verify", u, "--json")
    assert code == 0, err
    assert json.loads(out)["ok"] is True

    # usable as --artifacts: the manifest checks out and the graphs run, giving the original's outputs
    from exporter.manifest import load_manifest
    from runtime.backend import OnnxRuntimeBackend

    assert list(load_manifest(u).verify()) == []
    a, b = OnnxRuntimeBackend(tiny_artifacts), OnnxRuntimeBackend(u)
    feeds = a.specs["text_encoder"].dummy_inputs(2, 64, 64, seed=3)
    np.testing.assert_array_equal(a.run("text_encoder", feeds)["hidden_states"], b.run("text_encoder", feeds)["hidden_states"])

    # a bundle's unpacked folder packs again (bundle.json is not part of the artifacts)
    code, _, err = run_cli("pack", "--artifacts", u, "--out", tmp_path / "again.tar.gz")
    assert code == 0, err
    code, _, err = run_cli("pack", "--artifacts", u, "--out", tmp_path / "again.tar.gz")
    assert code == 2 and "already exists" in last_error(err)


def test_flipped_byte_in_a_file(bundle: Path, tmp_path: Path) -> None:
    entries = members(bundle)
    tampered = []
    for info, data in entries:
        if info.name == "unet/model.onnx":
            data = bytearray(data)  # type: ignore[arg-type]
            data[len(data) // 2] ^= 0x01
            data = bytes(data)
        tampered.append((info, data))
    bad = write_tar(tmp_path / "bad.tar.gz", tampered)
    code, _, err = run_cli("verify", bad)
    assert code == 1
    assert "unet/model.onnx does not match its sha256 in bundle.json" in last_error(err)
    code, _, err = run_cli("unpack", bad, "--out", tmp_path / "u")
    assert code == 1 and "unet/model.onnx does not match its sha256" in last_error(err)
    assert not (tmp_path / "u").exists() and not list(tmp_path.glob(".u.partial-*"))


def test_flipped_byte_in_the_archive(bundle: Path, tmp_path: Path) -> None:
    raw = bytearray(bundle.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(raw)
    code, _, err = run_cli("verify", bad)
    assert code == 1
    msg = last_error(err)  # where the flip lands decides which check sees it first; the CRC-32 catches it at the latest
    assert any(s in msg for s in ("truncated or corrupt", "does not match its sha256", "unexpected entry", "bytes, bundle.json says")), msg


def test_flipped_byte_and_extra_file_in_unpacked_folder(bundle: Path, tmp_path: Path) -> None:
    u = tmp_path / "u"
    assert run_cli("unpack", bundle, "--out", u)[0] == 0
    (u / "notes.txt").write_text("not from the bundle")
    code, _, err = run_cli("verify", u)
    assert code == 1 and "unexpected file notes.txt" in last_error(err)
    (u / "notes.txt").unlink()
    p = u / "vae_decoder" / "model.onnx"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(data)
    code, _, err = run_cli("verify", u)
    assert code == 1 and "vae_decoder/model.onnx does not match its sha256" in last_error(err)


def test_missing_file(bundle: Path, tmp_path: Path) -> None:
    entries = [(i, d) for i, d in members(bundle) if i.name != "tokenizer_2/tokenizer.json"]
    bad = write_tar(tmp_path / "partial.tar.gz", entries)
    code, _, err = run_cli("verify", bad)
    assert code == 1
    assert "tokenizer_2/tokenizer.json is missing: the archive is truncated or was packed partially" in last_error(err)
    code, _, err = run_cli("unpack", bad, "--out", tmp_path / "u")
    assert code == 1 and not (tmp_path / "u").exists()

    u = tmp_path / "u2"
    assert run_cli("unpack", bundle, "--out", u)[0] == 0
    (u / "scheduler" / "scheduler_config.json").unlink()
    code, _, err = run_cli("verify", u)
    assert code == 1 and "scheduler/scheduler_config.json is missing: the folder is incomplete" in last_error(err)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "unlisted"])
def test_unpack_refuses_escaping_entries(bundle: Path, tmp_path: Path, kind: str) -> None:
    entries = members(bundle)
    head, rest = entries[0], entries[1:]
    assert head[0].name == "bundle.json"
    target = tmp_path / "escaped.txt"
    if kind == "dotdot":
        evil = reg("../escaped.txt", b"owned")
    elif kind == "absolute":
        evil = reg(str(target), b"owned")
    elif kind == "unlisted":
        evil = reg("tokenizer/extra.json", b"{}")
    else:
        evil = (tarfile.TarInfo("tokenizer/vocab.json"), None)
        evil[0].type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        evil[0].linkname = str(target) if kind == "symlink" else "../../escaped.txt"
    bad = write_tar(tmp_path / "evil.tar.gz", [head, evil, *rest])  # the evil entry right after bundle.json
    out = tmp_path / "out" / "u"
    code, _, err = run_cli("unpack", bad, "--out", out)
    assert code == 1
    msg = last_error(err)
    expected = {"dotdot": "escapes the target folder", "absolute": "escapes the target folder",
                "symlink": "is a symbolic link: bundles hold regular files only",
                "hardlink": "is a hard link: bundles hold regular files only",
                "unlisted": "unexpected entry 'tokenizer/extra.json'"}[kind]
    assert expected in msg, msg
    assert not target.exists() and not (tmp_path / "out" / "escaped.txt").exists()
    assert not out.exists() and not list(out.parent.glob(".u.partial-*"))
    assert run_cli("verify", bad)[0] == 1


def test_bundle_json_listing_an_escaping_path_is_refused(bundle: Path, tmp_path: Path) -> None:
    entries = members(bundle)
    head = json.loads(entries[0][1])  # type: ignore[arg-type]
    head["files"]["../../etc/cron.d/x"] = {"sha256": "0" * 64, "bytes": 1}
    bad = write_tar(tmp_path / "evil.tar.gz", [reg("bundle.json", json.dumps(head).encode()), *entries[1:]])
    code, _, err = run_cli("unpack", bad, "--out", tmp_path / "u")
    assert code == 1 and "escapes the bundle folder: refused" in last_error(err)


@pytest.mark.parametrize("how", ["gzip cut in half", "tar cut at a member boundary"])
def test_truncated_archive(bundle: Path, tmp_path: Path, how: str) -> None:
    bad = tmp_path / "cut.tar.gz"
    if how == "gzip cut in half":
        raw = bundle.read_bytes()
        bad.write_bytes(raw[: len(raw) // 2])
        expected = "truncated or corrupt"
    else:  # an uncompressed tar that stops exactly before a member: tarfile sees a clean end
        plain = gzip.decompress(bundle.read_bytes())
        with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
            cut_at = next(m for m in tar.getmembers() if m.name == "unet/model.onnx")
        bad = tmp_path / "cut.tar"
        bad.write_bytes(plain[: cut_at.offset])
        expected = "is missing: the archive is truncated or was packed partially"
    code, _, err = run_cli("verify", bad)
    assert code == 1 and expected in last_error(err), err
    code, _, err = run_cli("unpack", bad, "--out", tmp_path / "u")
    assert code == 1 and expected in last_error(err)
    assert not (tmp_path / "u").exists() and not list(tmp_path.glob(".u.partial-*"))


def test_not_a_bundle(tiny_artifacts: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("verify", tiny_artifacts)
    assert code == 2 and "no bundle.json (it is an artifacts folder" in last_error(err)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b" + os.urandom(1000))
    code, _, err = run_cli("verify", junk)
    assert code == 1 and "truncated or corrupt" in last_error(err)
    code, _, err = run_cli("verify", tmp_path / "nope.tar.gz")
    assert code == 2 and "does not exist" in last_error(err)
    code, _, err = run_cli("pack", "--artifacts", tmp_path, "--out", tmp_path / "x.tar.gz")
    assert code == 2 and "not a koala-trt artifacts folder" in last_error(err)


def test_engine_bundle_on_a_machine_without_that_gpu(tiny_artifacts: Path, tmp_path: Path) -> None:
    from engines.compat import gather_facts

    here = gather_facts()
    if any(g.compute_capability == "8.9" for g in here.gpus):
        pytest.skip("this machine has a compute capability 8.9 GPU: the mismatch cannot be shown here")
    eng = engines_folder(tmp_path / "engines", tiny_artifacts)
    b = tmp_path / "engines.tar.gz"
    code, out, err = run_cli("pack", "--artifacts", tiny_artifacts, "--engines", eng, "--out", b, "--level", "1")
    assert code == 0, err
    assert "TensorRT 10.8.0.43 on compute capability 8.9 (built on NVIDIA GeForce RTX 4090)" in out

    code, out, err = run_cli("verify", b)
    assert code == 1
    msg = last_error(err)
    assert "the bundle's engines cannot run here: built for NVIDIA GeForce RTX 4090 (sm_89)" in msg, msg
    if here.gpus:
        assert "do not run on another compute capability" in msg
    else:
        assert "no NVIDIA GPU found" in msg or "nvidia-smi" in msg
        assert "--no-device-check" in msg

    code, out, err = run_cli("verify", b, "--no-device-check")
    assert code == 0, err
    assert "device check skipped" in out

    # a bundle.json edited to drop the device requirement is caught by its own engines
    entries = members(b)
    head = json.loads(entries[0][1])  # type: ignore[arg-type]
    head["requirements"]["backend"] = "onnxruntime"
    edited = write_tar(tmp_path / "edited.tar.gz", [reg("bundle.json", json.dumps(head).encode()), *entries[1:]])
    code, _, err = run_cli("verify", edited)
    assert code == 1 and "says backend 'onnxruntime' but the bundle carries engines" in last_error(err)

    u = tmp_path / "u"
    code, out, err = run_cli("unpack", b, "--out", u)
    assert code == 0, err
    assert sha(u / "engines" / "unet.fp32.sm89.plan") == sha(eng / "unet.fp32.sm89.plan")
    assert (u / "engines" / "manifest.json").read_bytes() == (eng / "manifest.json").read_bytes()
    assert run_cli("verify", u, "--no-device-check")[0] == 0

    # --no-graphs: the unet graph stays home, its engine replaces it
    slim = tmp_path / "slim.tar.gz"
    code, out, err = run_cli("pack", "--artifacts", tiny_artifacts, "--engines", eng, "--out", slim, "--no-graphs", "--json")
    assert code == 0, err
    assert json.loads(out)["omitted"] == ["unet/model.onnx"]
    assert run_cli("verify", slim, "--no-device-check")[0] == 0
    with tarfile.open(slim) as tar:
        assert "unet/model.onnx" not in tar.getnames() and "engines/unet.fp32.sm89.plan" in tar.getnames()

    # the unpacked slim bundle feeds `triton` with its own engines folder, and says why not without it
    us = tmp_path / "us"
    assert run_cli("unpack", slim, "--out", us)[0] == 0
    code, _, err = run_cli("triton", "--artifacts", us, "--out", tmp_path / "r1")
    assert code == 2 and "unet: unet/model.onnx is missing" in last_error(err) and not (tmp_path / "r1").exists()
    code, out, err = run_cli("triton", "--artifacts", us, "--engines", us / "engines", "--out", tmp_path / "r2", "--json")
    assert code == 0, err
    assert json.loads(out)["models"]["koala_unet"]["platform"] == "tensorrt_plan"


def test_engine_requirements_against_given_devices() -> None:
    """verify's device check on an older bundle.json (gpu + tensorrt_version only), on given machine
    facts (not this machine's hardware). The full table is tests/test_compat.py."""
    from engines.compat import MachineFacts
    from engines.cuda import DeviceInfo
    from shipping.bundle import device_problem

    req = {"backend": "tensorrt", "gpu": {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "sm_89"},
           "tensorrt_version": "10.8.0.43"}
    h100 = MachineFacts((DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", 80 << 30),), "10.8.0.43")
    problem, _ = device_problem(req, h100)
    assert problem == ("the bundle's engines cannot run here: built for NVIDIA GeForce RTX 4090 (sm_89) but this GPU is "
                       "NVIDIA H100 80GB HBM3 (sm_90): TensorRT engines do not run on another compute capability; "
                       "rebuild them for this machine with `koala-trt build` (the engines manifest records its build.args)")
    l40s = (DeviceInfo("NVIDIA L40S", "8.9", 48 << 30),)
    problem, warnings = device_problem(req, MachineFacts(l40s, "10.8.0.43"))
    assert problem is None and warnings == [
        "engines were built on NVIDIA GeForce RTX 4090, this GPU is NVIDIA L40S (same sm_89): TensorRT does not promise "
        "speed or correctness across GPU models (its kernels were timed on the build card)"]
    problem, _ = device_problem(req, MachineFacts(l40s, "10.7.0.23"))
    assert problem is not None and "but this machine has TensorRT 10.7.0.23" in problem
    problem, _ = device_problem(req, MachineFacts(l40s, None))
    assert problem is not None and "TensorRT is not installed here (no `tensorrt` Python module)" in problem
    two = (DeviceInfo("NVIDIA L40S", "8.9", 48 << 30), DeviceInfo("NVIDIA GeForce RTX 4090", "8.9", 24 << 30, index=1))
    assert device_problem({**req, "tensorrt_version": "10.8.0"}, MachineFacts(two, "10.8.0.43")) == (None, [])


def test_engines_manifest_without_required_keys(tiny_artifacts: Path, tmp_path: Path) -> None:
    eng = engines_folder(tmp_path / "engines", tiny_artifacts)
    data = json.loads((eng / "manifest.json").read_text())
    del data["tensorrt"]
    (eng / "manifest.json").write_text(json.dumps(data))
    code, _, err = run_cli("pack", "--artifacts", tiny_artifacts, "--engines", eng, "--out", tmp_path / "b.tar.gz")
    assert code == 2 and "'tensorrt'" in last_error(err)
    assert not (tmp_path / "b.tar.gz").exists()


# --------------------------------------------------------------------------------------------
# Triton model repository
# --------------------------------------------------------------------------------------------
def minimal_model_config():
    """inference.ModelConfig restricted to the fields koala-trt writes, with Triton's field names
    and numbers (model_config.proto); built here so the check needs nothing from the network."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="koala_test_model_config.proto", package="inference", syntax="proto3")
    dt = f.enum_type.add(name="DataType")
    for i, n in enumerate(["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
                           "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]):
        dt.value.add(name=n, number=i)

    def msg(name: str, fields: list[tuple[str, int, int, bool, str]]):
        m = f.message_type.add(name=name)
        for fname, num, ftype, repeated, tname in fields:
            fd = m.field.add(name=fname, number=num, type=ftype, label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
            if tname:
                fd.type_name = tname
        return m

    msg("ModelTensorReshape", [("shape", 1, F.TYPE_INT64, True, "")])
    io_fields = [("name", 1, F.TYPE_STRING, False, ""), ("data_type", 2, F.TYPE_ENUM, False, ".inference.DataType"),
                 ("reshape", 5, F.TYPE_MESSAGE, False, ".inference.ModelTensorReshape")]
    msg("ModelInput", [*io_fields, ("dims", 4, F.TYPE_INT64, True, ""), ("optional", 8, F.TYPE_BOOL, False, "")])
    msg("ModelOutput", [*io_fields, ("dims", 3, F.TYPE_INT64, True, "")])
    msg("ModelDynamicBatching", [("max_queue_delay_microseconds", 2, F.TYPE_UINT64, False, "")])
    ig = msg("ModelInstanceGroup", [("count", 2, F.TYPE_INT32, False, ""), ("kind", 4, F.TYPE_ENUM, False, ".inference.ModelInstanceGroup.Kind")])
    kind = ig.enum_type.add(name="Kind")
    for i, n in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=n, number=i)
    msg("ModelConfig", [("name", 1, F.TYPE_STRING, False, ""), ("platform", 2, F.TYPE_STRING, False, ""),
                        ("max_batch_size", 4, F.TYPE_INT32, False, ""), ("input", 5, F.TYPE_MESSAGE, True, ".inference.ModelInput"),
                        ("output", 6, F.TYPE_MESSAGE, True, ".inference.ModelOutput"),
                        ("instance_group", 7, F.TYPE_MESSAGE, True, ".inference.ModelInstanceGroup"),
                        ("default_model_filename", 8, F.TYPE_STRING, False, ""),
                        ("dynamic_batching", 11, F.TYPE_MESSAGE, False, ".inference.ModelDynamicBatching"),
                        ("backend", 17, F.TYPE_STRING, False, "")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


OFFICIAL_SCHEMA = Path(__file__).parent / "data" / "triton" / "model_config_pb2.py"  # tritonclient 2.73.0's, vendored


@pytest.fixture(scope="session")
def official_model_config():
    """Triton's own ModelConfig: tritonclient 2.73.0's generated model_config_pb2, vendored under
    tests/data/triton/ (README there: provenance, license, why not installed). Loaded by file path:
    no network, no cache; it needs only protobuf, which constraints.txt pins, so a load failure is a
    test failure, never a skip."""
    from unittest import mock

    from google.protobuf import descriptor_pool

    mod_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", OFFICIAL_SCHEMA)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    # a pool of its own: tritonclient.grpc (tests/test_serve.py) registers its own model_config.proto
    # in the default pool, which refuses a second file of that name
    pool = descriptor_pool.DescriptorPool()
    with mock.patch.object(descriptor_pool, "Default", lambda: pool):
        mod_spec.loader.exec_module(module)
    return module.ModelConfig


@pytest.fixture(scope="module")
def repo(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    code, stdout, err = run_cli("triton", "--artifacts", tiny_artifacts, "--out", out)
    assert code == 0, err
    return out


def check_repository(repo: Path, artifacts: Path, config_cls, engines: dict[str, str] | None = None) -> None:
    """Every model folder: a config that parses, named as its folder, whose tensors are the spec's."""
    from exporter.manifest import load_manifest
    from google.protobuf import text_format

    from shipping.triton_io import from_triton, to_triton

    m = load_manifest(artifacts)
    engines = engines or {}
    names = {p.name for p in repo.iterdir()}
    assert names == {"koala", *(f"koala_{c}" for c in m.components)}
    dtypes = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64"}
    layout = json.loads((repo / "koala" / "1" / "pipeline" / "triton.json").read_text())["models"]
    for comp in m.components:
        model = f"koala_{comp}"
        cfg = text_format.Parse((repo / model / "config.pbtxt").read_text(), config_cls())
        spec = m.spec(comp)
        assert cfg.name == model
        assert cfg.platform == ("tensorrt_plan" if comp in engines else "onnxruntime_onnx")
        # ONNX models batch up to the export's range (8); the test engines folders' plans have a static
        # batch dim (engines_folder), which Triton cannot batch: max_batch_size 0, batch in the dims
        batched = comp not in engines
        assert cfg.max_batch_size == (8 if batched else 0) and m.shape_range(comp).batch[2] == 8
        assert cfg.HasField("dynamic_batching") == batched
        assert (repo / model / "1" / cfg.default_model_filename).is_file()
        assert layout[comp] == {"model": model, "platform": cfg.platform, "batched": batched,
                                "max_batch_size": 8 if batched else 0}
        feeds = spec.dummy_inputs(2, 64, 64)
        for tensors, declared in ((spec.inputs, cfg.input), (spec.outputs, cfg.output)):
            assert [t.name for t in tensors] == [d.name for d in declared]
            for t, d in zip(tensors, declared):
                assert config_cls.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type \
                    .values_by_number[d.data_type].name == dtypes[t.dtype]
                if not batched:  # the whole shape is declared, dynamic dims as -1
                    assert list(d.dims) == [x if isinstance(x, int) else -1 for x in t.dims]
                    assert not d.HasField("reshape")
                    if tensors is spec.inputs:
                        assert to_triton(t, feeds[t.name], False).shape == feeds[t.name].shape
                    continue
                rest = [x if isinstance(x, int) else -1 for x in t.dims[1:]]  # Triton owns dim 0 (batch)
                assert list(d.dims) == (rest or [1])
                assert d.HasField("reshape") == (not rest)
                if tensors is spec.inputs:  # what model.py sends fits the declared dims, and Triton's reshape restores the spec shape
                    sent = to_triton(t, feeds[t.name], True)
                    assert sent.shape[0] == 2 and all(x in (-1, n) for x, n in zip(d.dims, sent.shape[1:]))
                    restored = sent.reshape((2, *d.reshape.shape)) if d.HasField("reshape") else sent
                    assert restored.shape == feeds[t.name].shape
                    assert from_triton(t, sent, True).shape == feeds[t.name].shape
    for comp, plan in engines.items():
        assert sha(repo / f"koala_{comp}" / "1" / "model.plan") == plan

    cfg = text_format.Parse((repo / "koala" / "config.pbtxt").read_text(), config_cls())
    assert cfg.backend == "python" and cfg.max_batch_size == 0
    assert [i.name for i in cfg.input][0] == "prompt" and not cfg.input[0].optional
    assert all(i.optional for i in cfg.input[1:])
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("image", [-1, -1, 3])]
    source = (repo / "koala" / "1" / "model.py").read_text()
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TritonPythonModel")
    assert {"initialize", "execute", "finalize"} <= {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    pipeline = repo / "koala" / "1" / "pipeline"
    art = json.loads((artifacts / "manifest.json").read_text())
    for rel in art["files"]:
        graph = any(rel.startswith(c + "/") for c in m.components)
        assert (pipeline / rel).exists() != graph, rel


def test_triton_repository_configs_parse_minimal_schema(repo: Path, tiny_artifacts: Path) -> None:
    check_repository(repo, tiny_artifacts, minimal_model_config())


def test_triton_repository_configs_parse_official_schema(repo: Path, tiny_artifacts: Path, official_model_config) -> None:
    check_repository(repo, tiny_artifacts, official_model_config)


def test_triton_repository_with_an_engine(tiny_artifacts: Path, tmp_path: Path) -> None:
    eng = engines_folder(tmp_path / "engines", tiny_artifacts)
    out = tmp_path / "repo"
    code, stdout, err = run_cli("triton", "--artifacts", tiny_artifacts, "--engines", eng, "--out", out, "--json")
    assert code == 0, err
    models = json.loads(stdout)["models"]
    assert models["koala_unet"]["platform"] == "tensorrt_plan" and models["koala_vae_decoder"]["platform"] == "onnxruntime_onnx"
    # the plan was built for the static CFG batch 2 (rtx4090's batch 1 x guidance): Triton cannot batch it, so
    # max_batch_size is 0 with the batch dim in the shapes; the ONNX model keeps the export's range (8)
    assert (models["koala_unet"]["max_batch_size"], models["koala_unet"]["batched"]) == (0, False)
    assert models["koala_vae_decoder"]["max_batch_size"] == 8
    check_repository(out, tiny_artifacts, minimal_model_config(), engines={"unet": sha(eng / "unet.fp32.sm89.plan")})
    assert 'kind: KIND_GPU' in (out / "koala_unet" / "config.pbtxt").read_text()

    code, _, err = run_cli("triton", "--artifacts", tiny_artifacts, "--out", out)
    assert code == 2 and "already exists" in last_error(err)
    code, _, err = run_cli("triton", "--artifacts", tiny_artifacts, "--out", tmp_path / "r2", "--name", "bad name")
    assert code == 2 and "--name" in last_error(err)
    assert not (tmp_path / "r2").exists()
    code, _, err = run_cli("triton", "--artifacts", tiny_artifacts, "--out", tmp_path / "r3", "--device", "cpu", "--max-batch", "2")
    assert code == 0, err
    text = (tmp_path / "r3" / "koala_unet" / "config.pbtxt").read_text()
    assert "max_batch_size: 2" in text and "kind: KIND_CPU" in text
    shutil.rmtree(tmp_path / "r3")


def _triton_python_backend_standin(repo: Path):
    """A stand-in for `triton_python_backend_utils` (LABELLED TEST DOUBLE: no Triton server runs here).
    It implements the few calls model.py makes, and a BLS request runs the named component model's
    own files from the repository in ONNX Runtime, applying the config's batch reshape ([B, 1] -> [B])
    as Triton would. What it checks: model.py's marshalling, the sampler wiring and the image out."""
    import types

    from koala_core.ort import make_session

    sessions: dict[str, object] = {}

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self._name, self._array = name, np.asarray(array)

        def name(self) -> str:
            return self._name

        def as_numpy(self) -> np.ndarray:
            return self._array

        def is_cpu(self) -> bool:
            return True

    class TritonError:
        def __init__(self, msg: str) -> None:
            self._msg = msg

        def message(self) -> str:
            return self._msg

    class InferenceResponse:
        def __init__(self, output_tensors: list, error: TritonError | None = None) -> None:
            self.output_tensors, self._error = output_tensors, error

        def has_error(self) -> bool:
            return self._error is not None

        def error(self) -> TritonError | None:
            return self._error

    class InferenceRequest:
        def __init__(self, model_name: str, requested_output_names: list, inputs: list, **kwargs: object) -> None:
            self.model_name, self.outputs, self.inputs = model_name, requested_output_names, inputs

        def exec(self) -> InferenceResponse:
            if self.model_name not in sessions:
                onnx_file = next((repo / self.model_name / "1").glob("*.onnx"))
                sessions[self.model_name] = make_session(onnx_file, providers=["CPUExecutionProvider"])
            sess = sessions[self.model_name]
            ranks = {i.name: len(i.shape) for i in sess.get_inputs()}
            feeds = {t.name(): t.as_numpy().reshape(t.as_numpy().shape[:ranks[t.name()]]) for t in self.inputs}
            outs = sess.run(self.outputs, feeds)
            return InferenceResponse([Tensor(n, o) for n, o in zip(self.outputs, outs)])

    class Request:
        def __init__(self, **inputs: np.ndarray) -> None:
            self.tensors = {k: Tensor(k, v) for k, v in inputs.items()}

    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor, mod.InferenceRequest, mod.InferenceResponse, mod.TritonError = Tensor, InferenceRequest, InferenceResponse, TritonError
    mod.TritonModelException = RuntimeError
    mod.get_output_tensor_by_name = lambda response, name: next(t for t in response.output_tensors if t.name() == name)
    mod.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    mod.Request = Request
    return mod


def test_triton_python_model_generates_the_same_image_as_generate(repo: Path, tiny_artifacts: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository's sampler model (model.py) over BLS calls to the component models gives the
    same pixels as `koala-trt generate` on the same artifacts, prompt, seed and steps.

    Pixel-identical is a fair demand only for the same kernels: both paths get ONNX Runtime's CPU
    provider with 2 intra-op threads explicitly (generate alone would pick CUDA under onnxruntime-gpu),
    in this one process, on the same graph bytes and inputs; ORT's CPU kernels are deterministic for a
    fixed provider, thread count and ISA, so any difference is the wiring's."""
    from PIL import Image

    import koala_core.ort

    pinned, opened = koala_core.ort.make_session, []

    def cpu_session(path, providers=None, threads=None, optimize=True, precision=None):  # every session of this test
        opened.append(Path(path))
        return pinned(path, providers=["CPUExecutionProvider"], threads=2, optimize=optimize, precision=precision)

    monkeypatch.setattr(koala_core.ort, "make_session", cpu_session)
    pb = _triton_python_backend_standin(repo)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("koala_triton_model", repo / "koala" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({})
    prompt = "a koala reading a newspaper in a cafe"
    request = pb.Request(prompt=np.array([prompt.encode()], dtype=object), seed=np.array([3], np.int64),
                         steps=np.array([4], np.int32), height=np.array([128], np.int32), width=np.array([128], np.int32))
    [response] = model.execute([request])
    assert not response.has_error(), response.error().message()
    image = pb.get_output_tensor_by_name(response, "image").as_numpy()
    model.finalize()
    assert image.dtype == np.uint8 and image.shape == (128, 128, 3) and image.std() > 1
    code, _, err = run_cli("generate", "--artifacts", tiny_artifacts, "--backend", "onnxruntime", "--prompt", prompt,
                           "--seed", "3", "--steps", "4", "--height", "128", "--width", "128", "--out", tmp_path / "g.png",
                           "--no-progress")
    assert code == 0, err
    # both paths opened their sessions through the pin: the repository's copies and the artifacts' files
    assert any(repo in p.parents for p in opened) and any(tiny_artifacts in p.parents for p in opened), opened
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png").convert("RGB")), image)
