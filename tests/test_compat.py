"""Can these engines run here? One table, asked of both callers of the one rule (engines.compat):
the runtime's check (engines.engine_manifest.check_compatible, what TensorRTBackend calls) and
`koala-trt verify`'s device check (shipping.bundle.device_problem on the requirements `pack` writes).
Both must give the same verdict: refused or not, with the same reason, and the same warnings.

LABELLED TEST DATA: no engine is built or run. The format-1 manifest is composed by the functions
`koala-trt build` uses (tests/engines_helpers.fake_engines_dir) for a fabricated RTX 4090; the
format-2 manifests are that data rewritten into the v2 layout the build is moving to (library,
targets, build_host), as the brief of issue 12/13 specifies it. The expected verdicts are written out
by hand from NVIDIA's rules (engines/compat.py's docstring cites them), not computed by the code.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from engines.compat import MachineFacts, installed_version, parse_nvidia_smi, release
from engines.cuda import DeviceInfo
from engines.engine_manifest import EnginesManifest, check_compatible, load_engines_manifest
from engines.engines_record import EnginesRecord
from engines_helpers import fake_engines_dir
from koala_core.errors import KoalaError, UsageError
from shipping.bundle import device_problem, engines_requirements

RTX4090 = DeviceInfo("NVIDIA GeForce RTX 4090", "8.9", 24 << 30, "12.8", "12.6")
L4 = DeviceInfo("NVIDIA L4", "8.9", 24 << 30)
RTX3060TI = DeviceInfo("NVIDIA GeForce RTX 3060 Ti", "8.6", 8 << 30)
RTX2080TI = DeviceInfo("NVIDIA GeForce RTX 2080 Ti", "7.5", 11 << 30)
RTX5090 = DeviceInfo("NVIDIA GeForce RTX 5090", "12.0", 32 << 30)
H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", 80 << 30)
A10 = DeviceInfo("NVIDIA A10", "8.6", 24 << 30)
TRT, RTX = "10.8.0.43", "1.7.1.116"

# Reasons, as the one rule words them (each case below names the one it expects).
CC = "engines do not run on another compute capability"
TRT_RELEASE = "a plan loads only in the TensorRT release (major.minor.patch) that built it"
TRT_VC = "a version-compatible plan loads only in the same or a later TensorRT release of the same major version"
RTX_RELEASE = "TensorRT-RTX engines load only in the TensorRT-RTX release that built them"
MISSING_TRT = "TensorRT is not installed here (no `tensorrt` Python module)"
MISSING_RTX = "TensorRT-RTX is not installed here (no `tensorrt_rtx` Python module)"
MODEL = "does not promise speed or correctness across GPU models"


@pytest.fixture(scope="module")
def v1(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A format-1 manifest as `koala-trt build` composes it for random:tiny on an RTX 4090."""
    root = fake_engines_dir(tiny_artifacts, tmp_path_factory.mktemp("compat") / "e")
    d = json.loads((root / "manifest.json").read_text())  # the build writes format 2: rewrite it as format 1 did
    assert d["format_version"] == 2
    host = d.pop("build_host")
    d.update(format_version=1, gpu=host["gpu"], tensorrt=d.pop("library")["version"], cuda=host["cuda"])
    del d["targets"], d["notes"]
    return d


def standard(v1: dict[str, Any], built_on: DeviceInfo, hc: str = "none", vc: bool = False, version: str = TRT) -> dict[str, Any]:
    """Format 1: standard TensorRT, built on `built_on` (its cc is the target)."""
    d = copy.deepcopy(v1)
    d["gpu"] = {"name": built_on.name, "compute_capability": built_on.compute_capability, "memory_bytes": built_on.memory_bytes}
    d["tensorrt"] = version
    d["flags"].update(hardware_compatibility=hc, version_compatible=vc)
    return d


def v2(v1: dict[str, Any], library: str, version: str, targets: list[str], built_on: DeviceInfo | None,
       hc: str = "none", vc: bool = False) -> dict[str, Any]:
    """Format 2 (library / targets / build_host), without format 1's top-level gpu and tensorrt keys."""
    d = copy.deepcopy(v1)
    del d["gpu"], d["tensorrt"]
    cuda = d.pop("cuda")
    d["format_version"] = 2
    d["library"] = {"name": library, "version": version}
    d["targets"] = {"compute_capabilities": targets, "hardware_compatibility": hc, "version_compatible": vc}
    d["build_host"] = {"gpu": None if built_on is None else {"name": built_on.name, "compute_capability": built_on.compute_capability,
                                                             "memory_bytes": built_on.memory_bytes},
                       "cpu": "AMD EPYC", "cuda": None if built_on is None else cuda}
    return d


# (id, manifest maker, the local GPU, installed tensorrt, installed tensorrt_rtx, expected reasons (empty: runs), warns)
S = standard
CASES: list[tuple[str, Any, DeviceInfo, str | None, str | None, list[str], bool]] = [
    # --- standard TensorRT: compute capability and hardware compatibility
    ("cc-equal-same-card", lambda d: S(d, RTX4090), RTX4090, TRT, None, [], False),
    ("cc-equal-other-card-warns", lambda d: S(d, RTX4090), L4, TRT, None, [], True),
    ("cc-different", lambda d: S(d, RTX4090), RTX3060TI, TRT, None, [CC], False),
    ("ampere_plus-sm86-on-sm89", lambda d: S(d, RTX3060TI, "ampere_plus"), RTX4090, TRT, None, [], False),
    ("ampere_plus-on-sm90", lambda d: S(d, RTX3060TI, "ampere_plus"), H100, TRT, None, [], False),
    ("ampere_plus-on-sm75", lambda d: S(d, RTX3060TI, "ampere_plus"), RTX2080TI, TRT, None, [CC], False),
    ("same_cc-other-card-no-warning", lambda d: S(d, RTX3060TI, "same_compute_capability"), A10, TRT, None, [], False),
    ("same_cc-other-cc", lambda d: S(d, RTX3060TI, "same_compute_capability"), RTX4090, TRT, None, [CC], False),
    # --- standard TensorRT: version, not version compatible
    ("trt-build-number", lambda d: S(d, RTX4090), RTX4090, "10.8.0.44", None, [], False),
    ("trt-patch", lambda d: S(d, RTX4090), RTX4090, "10.8.1.2", None, [TRT_RELEASE], False),
    ("trt-minor", lambda d: S(d, RTX4090), RTX4090, "10.9.0.34", None, [TRT_RELEASE], False),
    ("trt-older-minor", lambda d: S(d, RTX4090), RTX4090, "10.7.0.23", None, [TRT_RELEASE], False),
    ("trt-major", lambda d: S(d, RTX4090), RTX4090, "11.0.0.1", None, [TRT_RELEASE], False),
    ("trt-missing", lambda d: S(d, RTX4090), RTX4090, None, RTX, [MISSING_TRT], False),
    # --- standard TensorRT: version compatible
    ("vc-build-number", lambda d: S(d, RTX4090, vc=True), RTX4090, "10.8.0.44", None, [], False),
    ("vc-later-patch", lambda d: S(d, RTX4090, vc=True), RTX4090, "10.8.1.2", None, [], False),
    ("vc-later-minor", lambda d: S(d, RTX4090, vc=True), RTX4090, "10.9.0.34", None, [], False),
    ("vc-next-major-10-to-11", lambda d: S(d, RTX4090, vc=True), RTX4090, "11.0.0.1", None, [], False),
    ("vc-major-10-to-12", lambda d: S(d, RTX4090, vc=True), RTX4090, "12.0.0.1", None, [TRT_VC], False),
    ("vc-older-minor", lambda d: S(d, RTX4090, vc=True), RTX4090, "10.7.0.23", None, [TRT_VC], False),
    ("vc-older-patch", lambda d: S(d, RTX4090, vc=True, version="10.8.1.2"), RTX4090, "10.8.0.43", None, [TRT_VC], False),
    ("vc-and-ampere_plus-both-wrong", lambda d: S(d, RTX3060TI, "ampere_plus", vc=True), RTX2080TI, "10.7.0.23", None,
     [CC, TRT_VC], False),
    # --- the same standard cases in format 2
    ("v2-trt-cc-equal", lambda d: v2(d, "tensorrt", TRT, ["8.9"], RTX4090), RTX4090, TRT, None, [], False),
    ("v2-trt-other-card-warns", lambda d: v2(d, "tensorrt", TRT, ["8.9"], RTX4090), L4, TRT, None, [], True),
    ("v2-trt-cc-different", lambda d: v2(d, "tensorrt", TRT, ["8.9"], RTX4090), RTX3060TI, TRT, None, [CC], False),
    ("v2-trt-ampere_plus", lambda d: v2(d, "tensorrt", TRT, ["8.6"], RTX3060TI, "ampere_plus"), RTX4090, TRT, None, [], False),
    ("v2-trt-patch", lambda d: v2(d, "tensorrt", TRT, ["8.9"], RTX4090), RTX4090, "10.8.1.2", None, [TRT_RELEASE], False),
    ("v2-trt-vc-minor", lambda d: v2(d, "tensorrt", TRT, ["8.9"], RTX4090, vc=True), RTX4090, "10.9.0.34", None, [], False),
    # --- TensorRT-RTX (format 2 only): targets, no warnings for another model, exact release
    ("rtx-portable-in-targets-sm89", lambda d: v2(d, "tensorrt-rtx", RTX, ["8.6", "8.9", "12.0"], None), RTX4090, None, RTX,
     [], False),
    ("rtx-portable-in-targets-sm120", lambda d: v2(d, "tensorrt-rtx", RTX, ["8.6", "8.9", "12.0"], None), RTX5090, None, RTX,
     [], False),
    ("rtx-portable-in-targets-other-model", lambda d: v2(d, "tensorrt-rtx", RTX, ["8.6", "8.9", "12.0"], RTX4090), A10, None,
     RTX, [], False),
    ("rtx-portable-out-of-targets-sm75", lambda d: v2(d, "tensorrt-rtx", RTX, ["8.6", "8.9", "12.0"], None), RTX2080TI, None,
     RTX, [CC], False),
    ("rtx-portable-out-of-targets-sm90", lambda d: v2(d, "tensorrt-rtx", RTX, ["8.6", "8.9", "12.0"], None), H100, None, RTX,
     [CC], False),
    ("rtx-single-target-other-cc", lambda d: v2(d, "tensorrt-rtx", RTX, ["8.6"], None), RTX4090, None, RTX, [CC], False),
    ("rtx-version-other-build", lambda d: v2(d, "tensorrt-rtx", RTX, ["8.9"], None), RTX4090, None, "1.7.1.117", [RTX_RELEASE], False),
    ("rtx-version-patch", lambda d: v2(d, "tensorrt-rtx", RTX, ["8.9"], None), RTX4090, None, "1.7.2.3", [RTX_RELEASE], False),
    ("rtx-version-minor", lambda d: v2(d, "tensorrt-rtx", RTX, ["8.9"], None), RTX4090, None, "1.8.0.10", [RTX_RELEASE], False),
    ("rtx-version-older", lambda d: v2(d, "tensorrt-rtx", RTX, ["8.9"], None), RTX4090, None, "1.6.0.5", [RTX_RELEASE], False),
    ("rtx-version-major", lambda d: v2(d, "tensorrt-rtx", RTX, ["8.9"], None), RTX4090, None, "2.0.0.1", [RTX_RELEASE], False),
    ("rtx-missing-only-trt-here", lambda d: v2(d, "tensorrt-rtx", RTX, ["8.9"], None), RTX4090, TRT, None, [MISSING_RTX], False),
]


def _runtime(tmp: Path, data: dict[str, Any], device: DeviceInfo, facts: MachineFacts) -> tuple[str | None, list[str]]:
    root = tmp / "engines"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps(data))
    m = load_engines_manifest(root)
    try:
        return None, check_compatible(m, device, facts.library_version(m.record.library.name))
    except KoalaError as e:
        return str(e), []


def _verify(data: dict[str, Any], facts: MachineFacts) -> tuple[str | None, list[str]]:
    record = EnginesRecord.from_json(data, "engines/manifest.json")
    return device_problem({"backend": "tensorrt", **engines_requirements(record)}, facts)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_runtime_and_verify_give_the_same_verdict(case: tuple, v1: dict[str, Any], tmp_path: Path) -> None:
    _, make, device, trt, rtx, reasons, warns = case
    data = make(v1)
    facts = MachineFacts((device,), trt, rtx)
    for who, (problem, warnings) in (("runtime", _runtime(tmp_path, data, device, facts)), ("verify", _verify(data, facts))):
        if reasons:
            assert problem is not None, f"{who} accepted what it must refuse"
            for reason in reasons:
                assert reason in problem, (who, problem)
            # no reason beyond those expected: each one starts "built for" (the GPU) or "built with" (the library)
            assert problem.count("built for ") + problem.count("built with ") == len(reasons), (who, problem)
        else:
            assert problem is None, (who, problem)
        assert len(warnings) == (1 if warns else 0) and all(MODEL in w for w in warnings), (who, warnings)


def test_refusals_name_the_cards_versions_and_rebuild_command(v1: dict[str, Any], tmp_path: Path) -> None:
    data = v2(v1, "tensorrt-rtx", RTX, ["8.6", "8.9", "12.0"], None)
    problem, _ = _runtime(tmp_path, data, RTX2080TI, MachineFacts((RTX2080TI,), None, "1.8.0.10"))
    assert problem is not None
    assert ("cannot run here: built for sm_86, sm_89, sm_120 (TensorRT-RTX targets) but this GPU is NVIDIA GeForce RTX 2080 Ti "
            "(sm_75): TensorRT-RTX engines do not run on another compute capability; built with TensorRT-RTX 1.7.1.116 but "
            f"this machine has TensorRT-RTX 1.8.0.10: {RTX_RELEASE}. Rebuild them on this machine: koala-trt build --onnx ") in problem
    assert " --profile rtx2080ti " in problem  # the built-in profile of the card found here
    verify_problem, _ = _verify(data, MachineFacts((RTX2080TI,), None, "1.8.0.10"))
    assert verify_problem is not None and verify_problem.startswith(
        "the bundle's engines cannot run here: built for sm_86, sm_89, sm_120 (TensorRT-RTX targets) but this GPU is")
    # a version-only refusal keeps the profile the engines were built with
    (tmp_path / "b").mkdir()
    problem, _ = _runtime(tmp_path / "b", data, RTX4090, MachineFacts((RTX4090,), None, "1.8.0.10"))
    assert problem is not None and " --profile rtx4090 " in problem and "compute capability" not in problem


def test_verify_without_a_gpu_says_how_to_skip(v1: dict[str, Any]) -> None:
    facts = MachineFacts((), TRT, RTX, why_no_gpu="no NVIDIA GPU found on this machine (nvidia-smi is not installed)")
    problem, _ = _verify(standard(v1, RTX4090), facts)
    assert problem == ("the bundle's engines cannot run here: built for NVIDIA GeForce RTX 4090 (sm_89), but no NVIDIA GPU found "
                       "on this machine (nvidia-smi is not installed); use `verify --no-device-check` to check integrity only")


def test_verify_takes_any_fitting_gpu_of_several(v1: dict[str, Any]) -> None:
    two = (H100, DeviceInfo("NVIDIA GeForce RTX 4090", "8.9", 24 << 30, index=1))
    assert _verify(standard(v1, RTX4090), MachineFacts(two, TRT)) == (None, [])
    problem, _ = _verify(standard(v1, RTX4090), MachineFacts((H100, DeviceInfo(A10.name, "8.6", 0, index=1)), TRT))
    assert problem is not None and "this machine's GPUs are GPU 0 NVIDIA H100 80GB HBM3 (sm_90), GPU 1 NVIDIA A10 (sm_86)" in problem


# --- the one reader: both layouts, and loud errors ---------------------------------------------------
def test_format_1_and_2_read_to_the_same_record(v1: dict[str, Any]) -> None:
    one = EnginesRecord.from_json(v1, "a/manifest.json")
    two = EnginesRecord.from_json(v2(v1, "tensorrt", TRT, ["8.9"], RTX4090), "b/manifest.json")
    assert one.compat.to_json() == two.compat.to_json() == {
        "library": {"name": "tensorrt", "version": "10.8.0.43"},
        "targets": {"compute_capabilities": ["8.9"], "hardware_compatibility": "none", "version_compatible": False},
        "built_on": {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}}
    assert one.engines == two.engines and (one.format_version, two.format_version) == (1, 2)
    assert one.build_host.gpu == two.build_host.gpu == DeviceInfo("NVIDIA GeForce RTX 4090", "8.9", 25769803776, "12.8", "12.6")
    rtx = EnginesRecord.from_json(v2(v1, "tensorrt-rtx", RTX, ["sm_86", "8.9", "12.0"], None), "c/manifest.json")
    assert rtx.targets.compute_capabilities == ("8.6", "8.9", "12.0") and rtx.build_host.gpu is None
    assert rtx.build_host.cpu == "AMD EPYC" and rtx.build_host.cuda is None


def _edit(d: dict[str, Any], path: str, value: Any = KeyError) -> dict[str, Any]:
    d = copy.deepcopy(d)
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return d


@pytest.mark.parametrize("fmt, path, value, message", [
    (1, "tensorrt", KeyError, "m.json lacks key 'tensorrt'"),
    (1, "gpu.compute_capability", KeyError, "m.json lacks key 'gpu.compute_capability'"),
    (1, "gpu.compute_capability", "eighty-nine", "m.json: key 'gpu.compute_capability' is not a compute capability (got 'eighty-nine')"),
    (1, "flags.hardware_compatibility", "turing_plus", "m.json: key 'flags.hardware_compatibility' is 'turing_plus', expected one of "
        "none, ampere_plus, same_compute_capability"),
    (1, "library", {"name": "tensorrt", "version": TRT}, "m.json: key 'library' belongs to format_version 2 but the file says format_version 1"),
    (1, "format_version", 3, "m.json was written by a newer koala-trt (format version 3); upgrade koala-trt"),
    (2, "library.version", KeyError, "m.json lacks key 'library.version'"),
    (2, "library.name", "tensorrt-llm", "m.json: key 'library.name' is 'tensorrt-llm', expected one of tensorrt, tensorrt-rtx"),
    (2, "targets.compute_capabilities", [], "m.json: key 'targets.compute_capabilities' must be a non-empty list"),
    (2, "targets.version_compatible", KeyError, "m.json lacks key 'targets.version_compatible'"),
    (2, "build_host", KeyError, "m.json lacks key 'build_host'"),
    (2, "build_host.gpu.name", KeyError, "m.json lacks key 'build_host.gpu.name'"),
    (2, "gpu", {"name": "x", "compute_capability": "8.9"}, "m.json: key 'gpu' is format_version 1's; format_version 2 has build_host.gpu"),
    (2, "tensorrt", TRT, "m.json: key 'tensorrt' is format_version 1's; format_version 2 has library.version"),
    (2, "engines.unet.sha256", KeyError, "m.json lacks key 'engines.unet.sha256'"),
    (2, "engines.unet.file", "../unet.plan", "m.json: engine file '../unet.plan' of unet is not a relative path inside the engines folder"),
])
def test_missing_or_renamed_keys_name_the_file_and_key(v1: dict[str, Any], fmt: int, path: str, value: Any, message: str) -> None:
    base = v1 if fmt == 1 else v2(v1, "tensorrt", TRT, ["8.9"], RTX4090)
    with pytest.raises(UsageError) as e:
        EnginesRecord.from_json(_edit(base, path, value), "m.json")
    assert str(e.value) == message


def test_the_runtime_loader_reads_format_2(v1: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(v2(v1, "tensorrt-rtx", RTX, ["8.6", "8.9"], None)))
    m = load_engines_manifest(tmp_path)
    assert isinstance(m, EnginesManifest) and m.record.library.label == "TensorRT-RTX"
    assert m.profile_shapes("unet")["sample"] == ((2, 4, 32, 32),) * 3  # the untyped parts are unchanged


# --- the fact gatherers -------------------------------------------------------------------------------
def test_release_drops_the_build_number_only() -> None:
    assert release("10.8.0.43") == release("10.8.0.44") == (10, 8, 0)
    assert release("10.8") == (10, 8, 0) and release("1.7.1.116") == (1, 7, 1)


def test_nvidia_smi_lines() -> None:
    gpus, why = parse_nvidia_smi("0, NVIDIA GeForce RTX 4090, 8.9, 24564\n1, NVIDIA L4, 8.9, [N/A]\nbad line\n")
    assert why == "" and [(g.index, g.name, g.compute_capability, g.memory_bytes) for g in gpus] == [
        (0, "NVIDIA GeForce RTX 4090", "8.9", 24564 << 20), (1, "NVIDIA L4", "8.9", 0)]
    assert parse_nvidia_smi("\n") == ((), "nvidia-smi lists no GPU")


def test_installed_versions_come_from_metadata() -> None:
    import importlib.metadata
    import importlib.util

    assert installed_version("koala_trt_no_such_module") is None
    if importlib.util.find_spec("tensorrt_rtx") is not None:
        # the venv pins tensorrt-rtx-cu12; its version is the distribution's, read without importing it
        assert installed_version("tensorrt_rtx") == importlib.metadata.version("tensorrt-rtx-cu12")
