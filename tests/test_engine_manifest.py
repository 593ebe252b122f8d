"""ENGINES/manifest.json and the load-time checks, on manifest data as a build writes it.

LABELLED TEST DATA: no engine is built here (no GPU, no TensorRT). The manifests below are composed by
the same functions `koala-trt build` uses (engines.build.compose_manifest / engine_entry) for a
fabricated device, with placeholder engine sizes; they test the records and the refusal logic only.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from engines.buildplan import make_build_plan
from engines.cuda import DeviceInfo
from engines.engine_manifest import check_compatible, load_engines_manifest
from engines.profile import load_profile
from engines_helpers import fake_engines_dir as _engines_dir
from exporter.manifest import load_manifest
from koala_core.errors import KoalaError, UsageError
from runtime.tensorrt_backend import check_feed_shapes

RTX4090 = DeviceInfo("NVIDIA GeForce RTX 4090", "8.9", 24 << 30, "12.8", "12.6")
RTX3060TI = DeviceInfo("NVIDIA GeForce RTX 3060 Ti", "8.6", 8 << 30, "12.8", "12.6")
L4 = DeviceInfo("NVIDIA L4", "8.9", 24 << 30, "12.8", "12.6")
RTX2080TI = DeviceInfo("NVIDIA GeForce RTX 2080 Ti", "7.5", 11 << 30, "12.8", "12.6")
TRT = "10.8.0.43"


def test_manifest_records_card_versions_sources_and_specs(tiny_artifacts: Path, tmp_path: Path) -> None:
    m = load_engines_manifest(_engines_dir(tiny_artifacts, tmp_path / "e"))
    d = m.data
    # literal expectations, not the DeviceInfo fields read back: 24 GiB = 25769803776 bytes; DeviceInfo's
    # 4th field is the driver's CUDA version, the 5th the runtime's
    assert d["format_version"] == 2 and d["library"] == {"name": "tensorrt", "version": "10.8.0.43"}
    assert d["targets"] == {"compute_capabilities": ["8.9"], "hardware_compatibility": "none", "version_compatible": False}
    assert d["build_host"]["gpu"] == {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9",
                                      "memory_bytes": 25769803776}
    assert d["build_host"]["cuda"] == {"runtime": "12.6", "driver": "12.8"}
    assert d["flags"]["strongly_typed"] and d["profile"]["name"] == "rtx4090"
    art = load_manifest(tiny_artifacts)
    for name, e in m.engines.items():
        assert e["file"] == f"{name}.fp32.{'b2.256x256' if name == 'unet' else 'b1.256x256' if name == 'vae_decoder' else 'b1-2-2'}.sm89.trt{TRT}.plan"
        assert e["source"]["onnx_sha256"] == art.data["files"][f"{name}/model.onnx"]["sha256"]
        assert m.spec(name).to_json() == art.spec(name).to_json()  # the runtime needs no artifacts folder
    assert m.profile_shapes("unet")["sample"] == ((2, 4, 32, 32),) * 3


def test_same_card_and_tensorrt_load_cleanly(tiny_artifacts: Path, tmp_path: Path) -> None:
    m = load_engines_manifest(_engines_dir(tiny_artifacts, tmp_path / "e"))
    assert check_compatible(m, RTX4090, TRT) == []


def test_another_card_is_refused_with_the_exact_rebuild_command(tiny_artifacts: Path, tmp_path: Path) -> None:
    m = load_engines_manifest(_engines_dir(tiny_artifacts, tmp_path / "e"))
    with pytest.raises(KoalaError) as e:
        check_compatible(m, RTX3060TI, TRT)
    msg = str(e.value)
    assert "NVIDIA GeForce RTX 4090 (sm_89)" in msg and "NVIDIA GeForce RTX 3060 Ti (sm_86)" in msg
    cmd = msg.split("Rebuild them on this machine: ")[1]
    assert cmd == (f"koala-trt build --onnx {shlex.quote(str(tiny_artifacts.resolve()))} --profile rtx3060ti "
                   f"--out {shlex.quote(str(m.root))} --precision fp32 --height 256 --width 256 --force")
    # ...and that command is a valid build: as a dry run it plans the same components for sm_86.
    code, out, err = run_cli(*shlex.split(cmd)[1:], "--dry-run", "--no-estimate", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["compute_capability"] == "8.6" and list(plan["components"]) == list(m.engines)


def test_another_tensorrt_version_is_refused(tiny_artifacts: Path, tmp_path: Path) -> None:
    m = load_engines_manifest(_engines_dir(tiny_artifacts, tmp_path / "e"))
    for other in ("10.9.0.34", "10.7.0.23", "11.0.0"):
        with pytest.raises(KoalaError, match=rf"built with TensorRT {TRT} but this machine has TensorRT {other}: a plan "
                                             r"loads only in the TensorRT release \(major.minor.patch\) that built it\. "
                                             r"Rebuild them on this machine: koala-trt build .*--profile rtx4090 "):
            check_compatible(m, RTX4090, other)


def test_version_compatible_engines_accept_later_tensorrt_only(tiny_artifacts: Path, tmp_path: Path) -> None:
    m = load_engines_manifest(_engines_dir(tiny_artifacts, tmp_path / "e", version_compatible=True))
    assert check_compatible(m, RTX4090, "10.9.0.34") == []
    assert check_compatible(m, RTX4090, "11.0.0") == []
    with pytest.raises(KoalaError, match="version compatible"):
        check_compatible(m, RTX4090, "10.7.0.23")


def test_hardware_compatibility_levels(tiny_artifacts: Path, tmp_path: Path) -> None:
    amp = load_engines_manifest(_engines_dir(tiny_artifacts, tmp_path / "a", hardware_compatibility="ampere_plus"))
    assert check_compatible(amp, RTX3060TI, TRT) == []  # AMPERE_PLUS: any sm_80+
    with pytest.raises(KoalaError, match="sm_75"):
        check_compatible(amp, RTX2080TI, TRT)
    same = load_engines_manifest(_engines_dir(tiny_artifacts, tmp_path / "s", hardware_compatibility="same_compute_capability"))
    assert check_compatible(same, L4, TRT) == []  # same sm_89, another model, no warning
    with pytest.raises(KoalaError):
        check_compatible(same, RTX3060TI, TRT)
    plain = load_engines_manifest(_engines_dir(tiny_artifacts, tmp_path / "p"))
    warnings = check_compatible(plain, L4, TRT)  # same sm_89 but not what it was built on
    assert len(warnings) == 1 and "NVIDIA L4" in warnings[0] and "koala-trt build" in warnings[0]


def test_unknown_card_gets_a_profile_placeholder(tiny_artifacts: Path, tmp_path: Path) -> None:
    m = load_engines_manifest(_engines_dir(tiny_artifacts, tmp_path / "e"))
    odd = DeviceInfo("NVIDIA GeForce GTX 1080", "6.1", 8 << 30)
    with pytest.raises(KoalaError, match=r'--profile sm61.toml .*--force \(no built-in.*compute_capability = "6.1"'):
        check_compatible(m, odd, TRT)


def test_feeds_outside_the_engine_profile_name_input_and_limit(tiny_artifacts: Path, tmp_path: Path) -> None:
    m = load_engines_manifest(_engines_dir(tiny_artifacts, tmp_path / "e"))
    spec = m.spec("unet")
    check_feed_shapes(m, "unet", spec.dummy_inputs(2, 256, 256))
    with pytest.raises(UsageError) as e:
        check_feed_shapes(m, "unet", spec.dummy_inputs(2, 512, 256))
    msg = str(e.value)
    assert msg.startswith("unet.sample: shape (2, 4, 64, 32)") and "dim 2 must be 32..32" in msg
    with pytest.raises(UsageError, match=r"text_encoder.input_ids: shape \(3, 77\).*dim 0 must be 1..2"):
        check_feed_shapes(m, "text_encoder", {"input_ids": np.zeros((3, 77), np.int32)})


def test_loading_errors(tmp_path: Path, tiny_artifacts: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_engines_manifest(tmp_path / "none")
    with pytest.raises(UsageError, match="not a koala-trt engines manifest"):
        load_engines_manifest(tiny_artifacts)  # an artifacts folder is not an engines folder


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_backend_without_tensorrt_says_what_is_missing(tiny_artifacts: Path, tmp_path: Path) -> None:
    from runtime.tensorrt_backend import TensorRTBackend

    with pytest.raises(KoalaError, match="missing: TensorRT"):
        TensorRTBackend(_engines_dir(tiny_artifacts, tmp_path / "e"))


def test_build_refuses_a_gpu_of_another_compute_capability(tiny_artifacts: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from engines.build import check_device

    prof = load_profile("rtx3060ti").with_overrides(height=256, width=256, precision="fp32")
    plan = make_build_plan([tiny_artifacts], prof, tmp_path / "e", None, TRT, estimate=False)
    notes: list[str] = []
    check_device(plan, RTX3060TI, notes.append)
    assert notes == []
    with pytest.raises(UsageError, match=r"profile rtx3060ti targets sm_86 but this GPU is NVIDIA GeForce RTX 4090 \(sm_89\)"):
        check_device(plan, RTX4090, notes.append)
    a10 = DeviceInfo("NVIDIA A10", "8.6", 24 << 30)
    check_device(plan, a10, notes.append)  # same sm_86, another model: allowed, noted
    assert len(notes) == 1 and "NVIDIA A10" in notes[0]
    portable = replace(prof, build=replace(prof.build, hardware_compatibility="ampere_plus"))
    plan = make_build_plan([tiny_artifacts], portable, tmp_path / "e", None, TRT, estimate=False)
    check_device(plan, RTX4090, notes.append)  # AMPERE_PLUS engines may be built on any sm_80+ GPU
    with pytest.raises(UsageError, match="sm_75"):
        check_device(plan, RTX2080TI, notes.append)


def test_timing_cache_is_reused_only_for_the_same_card_tensorrt_and_cuda(tiny_artifacts: Path, tmp_path: Path) -> None:
    from engines.build import _reuse_timing_cache

    old = _engines_dir(tiny_artifacts, tmp_path / "e")
    (old / "timing.cache").write_bytes(b"cache")
    for device, trt, reused in ((RTX4090, TRT, True), (RTX4090, "10.9.0.34", False), (L4, TRT, False),
                                (DeviceInfo(RTX4090.name, "8.9", RTX4090.memory_bytes, "12.8", "12.9"), TRT, False)):
        stage = tmp_path / f"stage-{device.name}-{device.runtime}-{trt}".replace(" ", "_")
        stage.mkdir()
        _reuse_timing_cache(old, stage, device, trt, lambda m: None)
        assert (stage / "timing.cache").is_file() is reused


def test_shipping_reads_the_manifest_the_build_writes(tiny_artifacts: Path, tmp_path: Path) -> None:
    """pack/verify/triton read ENGINES/manifest.json through the one reader (engines.engines_record,
    via load_engines_manifest().record): it must parse exactly what engines/build.py composes."""
    root = _engines_dir(tiny_artifacts, tmp_path / "eng", device=RTX3060TI)
    rec = load_engines_manifest(root).record
    # literal expectations (the profile's card and the TRT string the helper was given), not RTX3060TI's fields
    assert (rec.format_version, rec.library.name, rec.library.version) == (2, "tensorrt", "10.8.0.43")
    assert rec.targets.compute_capabilities == ("8.6",) and rec.targets.hardware_compatibility == "none"
    assert rec.build_host.gpu is not None and rec.build_host.gpu.name == "NVIDIA GeForce RTX 3060 Ti"
    assert rec.build_host.cuda == {"runtime": "12.6", "driver": "12.8"}
    written = json.loads((root / "manifest.json").read_text())["engines"]
    assert {c: (e.file, e.sha256, e.bytes) for c, e in rec.engines.items()} == \
        {c: (e["file"], e["sha256"], e["bytes"]) for c, e in written.items()}
    assert set(rec.engines) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
