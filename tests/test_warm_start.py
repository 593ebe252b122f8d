"""A warm start without re-hashing: the artifacts' record of verified files (exporter/artifacts_check.py)
and the openvino backend's compiled models imported on their record; a tampered or corrupt file is
still refused before it runs, and --verify hashes everything."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from exporter.artifacts_check import check_files, file_stamp
from exporter.manifest import VERIFIED, load_manifest
from koala_core.errors import UsageError


@pytest.fixture()
def artifacts(tiny_artifacts: Path, tmp_path: Path) -> Path:
    out = tmp_path / "tiny"
    shutil.copytree(tiny_artifacts, out, ignore=shutil.ignore_patterns(VERIFIED))
    return out


def _flip(path: Path, keep_mtime: bool = False) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:  # set mtime back: the change of ctime still shows
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_record_skips_hashing_and_still_refuses_tampering(artifacts: Path) -> None:
    m = load_manifest(artifacts)
    prefixes = ["unet/", "tokenizer/"]
    hashed = [0]
    total = check_files(m, prefixes, record=True, hashed=hashed)
    assert hashed == [total] and (artifacts / VERIFIED).is_file()
    assert check_files(m, prefixes, record=True, hashed=hashed) == total and hashed == [0]  # warm: nothing hashed
    graph = artifacts / "unet" / "model.onnx"
    for keep_mtime in (False, True):
        _flip(graph, keep_mtime)
        with pytest.raises(UsageError, match=r"unet/model.onnx is corrupt: its sha256 does not match the manifest"):
            check_files(m, prefixes, record=True)
        _flip(graph)  # back to the original bytes (a new stamp: hashed once more, then trusted)
        check_files(m, prefixes, record=True, hashed=hashed)
        assert hashed[0] > 0
    # A record forged to vouch for a changed file is believed by a warm start (it guards against
    # corruption, not against whoever can write the folder); --verify (record=False) hashes anyway.
    _flip(graph)
    doc = json.loads((artifacts / VERIFIED).read_text())
    doc["files"]["unet/model.onnx"]["stamp"] = file_stamp(graph)
    (artifacts / VERIFIED).write_text(json.dumps(doc))
    check_files(m, prefixes, record=True)
    with pytest.raises(UsageError, match="is corrupt"):
        check_files(m, prefixes, record=False)


def test_generate_refuses_a_tampered_graph_on_a_warm_start(artifacts: Path, tmp_path: Path) -> None:
    args = ["generate", "-a", artifacts, "-p", "a koala", "--steps", 1, "--height", 128, "--width", 128, "--seed", 1,
            "--no-progress"]
    code, _, err = run_cli(*args, "-o", tmp_path / "a.png")
    assert code == 0, err
    code, _, err = run_cli(*args, "-o", tmp_path / "b.png")
    assert code == 0 and "sha256 of 0.0 MiB, the rest on its verified record" in err, err
    _flip(artifacts / "vae_decoder" / "model.onnx", keep_mtime=True)
    code, _, err = run_cli(*args, "-o", tmp_path / "c.png")
    assert code == 2 and "vae_decoder/model.onnx is corrupt: its sha256 does not match the manifest" in err
    assert not (tmp_path / "c.png").exists()
    code, _, err = run_cli(*args, "--verify", "--no-verify", "-o", tmp_path / "d.png")
    assert code == 2 and "--verify and --no-verify contradict each other" in err


def test_openvino_imports_its_compiled_model_and_refuses_a_tampered_blob(artifacts: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from runtime.openvino_backend import BLOB, OpenVinoBackend, shapes_of

    m = load_manifest(artifacts)
    feeds = m.spec("vae_decoder").dummy_inputs(1, 128, 128, seed=3)
    logs: list[str] = []

    def backend(verify: bool = False) -> OpenVinoBackend:
        return OpenVinoBackend(m, threads=1, cpu_precision="fp32", cache_dir=tmp_path / "ov", log=logs.append, verify=verify)

    first = backend()
    want = first.run("vae_decoder", feeds)["sample"]
    blob = first.cache_dir("vae_decoder", shapes_of(m.spec("vae_decoder"), feeds)) / BLOB
    warm = backend()
    np.testing.assert_array_equal(warm.run("vae_decoder", feeds)["sample"], want)
    assert (first.cache_hits, warm.cache_hits, logs) == ({"vae_decoder": False}, {"vae_decoder": True}, [])
    warm.close()
    _flip(blob, keep_mtime=True)  # tampered, mtime set back: its ctime gives it away, the sha256 refuses it
    third = backend()
    np.testing.assert_array_equal(third.run("vae_decoder", feeds)["sample"], want)
    assert third.cache_hits == {"vae_decoder": False} and "its blobs do not match their sha256" in logs[-1]
    # verify=True (--verify) hashes the blob even where its stamp matches the record.
    record = blob.parent / "koala-cache.json"
    doc = json.loads(record.read_text())
    _flip(blob)
    doc["stats"] = {BLOB: file_stamp(blob)}
    record.write_text(json.dumps(doc))
    checked = backend(verify=True)
    np.testing.assert_array_equal(checked.run("vae_decoder", feeds)["sample"], want)
    assert checked.cache_hits == {"vae_decoder": False}
