"""The TensorRT runtime read against the libraries, on CPU: the library chosen before Polygraphy is
imported on every path, the runtime-cache writer's error handling, CUDA-graph capture (the error kept,
the capture ended, plain execution as fallback; TensorRT-RTX's own graph strategy), the pins of the GPU
packages, the driver/runtime mismatch and the int32 weight-streaming budget. Nothing here runs an engine:
the cuda-python runtime module is replaced at its one boundary (engines.cuda._rt) where a test needs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Every module a path that runs engines imports before it opens the TensorRT backend.
ENGINE_PATHS = {
    "validate": ["koala_trt.commands.validate", "validation.run", "validation.runners", "validation.compare"],
    "generate": ["koala_trt.commands.generate", "sampler.pipeline", "sampler.loop"],
    "bench": ["koala_trt.commands.bench", "validation.bench"],
    "serve": ["koala_trt.commands.serve", "shipping.serve", "shipping.triton"],
    "refit": ["koala_trt.commands.refit", "engines.refit"],
}


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_importing_validation_runners_then_choosing_tensorrt_rtx_reproduces_no_more() -> None:
    # The reported reproduction: it raised "Polygraphy was imported for the other TensorRT library".
    r = _python("import validation.runners, engines.trt as t; t.use_library('tensorrt-rtx'); print(t.library())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "tensorrt-rtx"


@pytest.mark.parametrize("path", sorted(ENGINE_PATHS))
def test_no_engine_path_imports_polygraphy_before_the_library_is_chosen(path: str) -> None:
    imports = "; ".join(f"import {m}" for m in ENGINE_PATHS[path])
    r = _python(f"import sys; {imports}\n"
                "leaked = sorted(m for m in sys.modules if m.split('.')[0] == 'polygraphy')\n"
                "assert not leaked, leaked\n"
                "import engines.trt as t; t.use_library('tensorrt-rtx')\n"
                "import polygraphy.backend.trt, os; assert os.environ['POLYGRAPHY_USE_TENSORRT_RTX'] == '1'")
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_walk_would_see_a_module_level_polygraphy_import() -> None:
    # The check above can fail: importing the comparison's Polygraphy pieces is what it catches.
    r = _python("import sys, polygraphy.backend.base; "
                "assert not [m for m in sys.modules if m.split('.')[0] == 'polygraphy']")
    assert r.returncode != 0


@pytest.mark.parametrize("command", ["validate", "generate", "bench"])
def test_each_command_chooses_tensorrt_rtx_from_the_manifest_before_polygraphy(command: str, tiny_artifacts: Path,
                                                                                tmp_path: Path) -> None:
    """On this CPU machine the command must stop at "missing: ... GPU", the line a machine without a GPU
    gets, and not at Polygraphy's library choice (what `validate --backend tensorrt` said before)."""
    from engines_helpers import fake_engines_dir

    engines = fake_engines_dir(tiny_artifacts, tmp_path / "eng", profile="rtx3060ti", library="tensorrt-rtx", trt="1.7.1.116")
    args = {"validate": ["validate", "--artifacts", tiny_artifacts, "--steps", "1", "--height", "64", "--width", "64"],
            "generate": ["generate", "--artifacts", tiny_artifacts, "--steps", "1", "--height", "64", "--width", "64",
                         "--out", tmp_path / "x.png", "--prompt", "a koala"],
            "bench": ["bench", "--artifacts", tiny_artifacts, "-c", "unet", "--no-end-to-end", "--height", "64", "--width", "64"]}
    argv = [str(a) for a in args[command]] + ["--backend", "tensorrt", "--engines", str(engines)]
    r = subprocess.run([sys.executable, "-m", "koala_trt.cli", *argv], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode != 0
    assert "Polygraphy was imported" not in r.stderr
    assert "Traceback" not in r.stderr
    assert "missing" in r.stderr and "tensorrt-rtx" in r.stderr.lower(), r.stderr[-1500:]


# ----- 2: the runtime cache writer ---------------------------------------------------------------

class _Engine:
    def __init__(self) -> None:
        self.closed = False

    def runtime_cache(self) -> bytes:
        return b"kernels"

    def close(self) -> None:
        self.closed = True


def _bare_backend(root: Path, logs: list[str]) -> Any:
    """A TensorRTBackend without a GPU: only what the runtime-cache writer and _unload read."""
    from engines.cuda import DeviceInfo
    from engines.libraries import library
    from runtime.tensorrt_backend import TensorRTBackend

    b = TensorRTBackend.__new__(TensorRTBackend)
    b.library = library("tensorrt-rtx")
    b.device = DeviceInfo("NVIDIA GeForce RTX 3060 Ti", "8.6", 8 << 30, "12.8", "12.6")
    b.trt_version = "1.7.1.116"
    b.manifest = SimpleNamespace(root=root)
    b.log = logs.append
    return b


def test_runtime_cache_into_an_unwritable_folder_warns_and_unload_still_frees(tmp_path: Path) -> None:
    from runtime.tensorrt_backend import _Session

    # As root a read-only mode does not stop writes; a file where the cache folder should be does
    # (atomic.check_writable_parent raises UsageError, which has no strerror: the old handler's crash).
    (tmp_path / "runtime-cache").write_text("not a folder")
    logs: list[str] = []
    b = _bare_backend(tmp_path, logs)
    released = []
    buf = SimpleNamespace(release=lambda: released.append(1))
    eng = _Engine()
    b._sessions = {"unet": _Session(engine=eng, static=True, buffers={"sample": buf})}
    b._unload("unet")
    assert eng.closed and released == [1] and b._sessions == {}
    assert len(logs) == 1 and logs[0].startswith("warning: cannot keep TensorRT-RTX's runtime cache")
    assert "not a writable folder" in logs[0]


def test_runtime_cache_is_written_where_it_can_be(tmp_path: Path) -> None:
    logs: list[str] = []
    b = _bare_backend(tmp_path, logs)
    b._save_runtime_cache("unet", _Engine())
    (cache,) = (tmp_path / "runtime-cache").iterdir()
    assert cache.read_bytes() == b"kernels" and cache.name.startswith("unet.nvidia-geforce-rtx-3060-ti.sm86.")
    assert logs == []


# ----- 3: TensorRT-RTX's own CUDA graphs -------------------------------------------------------------

def test_installed_tensorrt_rtx_has_the_graph_strategy_and_the_user_allocation_flag() -> None:
    trt = pytest.importorskip("tensorrt_rtx")
    assert hasattr(trt.CudaGraphStrategy, "WHOLE_GRAPH_CAPTURE") and hasattr(trt.CudaGraphStrategy, "DISABLED")
    prop = trt.IRuntimeConfig.cuda_graph_strategy
    assert isinstance(prop, property) and prop.fset is not None  # settable on the config
    assert hasattr(trt.IExecutionContext, "is_stream_capturable")
    assert hasattr(trt.BuilderFlag, "REQUIRE_USER_ALLOCATION")  # what a capture by hand would need instead


@pytest.mark.parametrize("graphs", [True, False])
def test_rtx_runtime_config_sets_the_libraries_graph_strategy(graphs: bool) -> None:
    trt = pytest.importorskip("tensorrt_rtx")
    from engines.trt import configure_rtx_runtime

    class Config:  # records what is set on it (a real IRuntimeConfig needs a deserialized engine: a GPU)
        def set_execution_context_allocation_strategy(self, s: Any) -> None:
            self.allocation = s

    cfg = Config()
    configure_rtx_runtime(cfg, trt, graphs)
    assert cfg.allocation == trt.ExecutionContextAllocationStrategy.USER_MANAGED
    assert cfg.cuda_graph_strategy == (trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE if graphs else trt.CudaGraphStrategy.DISABLED)


# ----- 4: a failed capture keeps its cause, ends the capture and falls back ----------------------

class FakeRuntime:
    """cuda-python's runtime module at engines.cuda's boundary: records the capture calls."""

    class cudaError_t:  # noqa: N801 - cuda-python's names
        cudaSuccess = 0
        cudaErrorStreamCaptureInvalidated = 901
        cudaErrorInsufficientDriver = 35
        cudaErrorNoDevice = 100

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeGlobal = 0

    def __init__(self, end_error: int = 901, device_error: int = 0) -> None:
        self.calls: list[str] = []
        self.end_error, self.device_error = end_error, device_error

    def cudaStreamBeginCapture(self, stream: Any, mode: Any) -> tuple[int]:  # noqa: N802
        self.calls.append("begin")
        return (0,)

    def cudaStreamEndCapture(self, stream: Any) -> tuple[int, Any]:  # noqa: N802
        self.calls.append("end")
        return (self.end_error, "graph" if self.end_error == 0 else None)

    def cudaGraphInstantiate(self, graph: Any, flags: int) -> tuple[int, Any]:  # noqa: N802
        self.calls.append("instantiate")
        return (0, "exec")

    def cudaGraphDestroy(self, graph: Any) -> int:  # noqa: N802
        self.calls.append("destroy")
        return 0

    def cudaGraphExecDestroy(self, e: Any) -> int:  # noqa: N802
        self.calls.append("exec_destroy")
        return 0

    def cudaGetErrorName(self, err: int) -> tuple[int, bytes]:  # noqa: N802
        return (0, {901: b"cudaErrorStreamCaptureInvalidated", 35: b"cudaErrorInsufficientDriver"}.get(err, b"cudaErrorUnknown"))

    def cudaGetDeviceCount(self) -> tuple[int, int]:  # noqa: N802
        return (self.device_error, 0 if self.device_error else 1)

    def cudaDriverGetVersion(self) -> tuple[int, int]:  # noqa: N802
        return (0, 12020)

    def cudaRuntimeGetVersion(self) -> tuple[int, int]:  # noqa: N802
        return (0, 12090)


def test_capture_keeps_the_enqueue_error_and_ends_the_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    from engines import cuda
    from koala_core.errors import KoalaError

    rt = FakeRuntime()
    monkeypatch.setattr(cuda, "_rt", lambda: rt)

    def enqueue(stream: Any) -> None:
        raise KoalaError("TensorRT execution failed (see the log above)")

    with pytest.raises(KoalaError, match="TensorRT execution failed"):  # not the end-capture's invalidated error
        cuda.Graph("stream", enqueue)
    assert rt.calls == ["begin", "end"]  # the capture is ended, nothing instantiated


def test_capture_that_succeeds_is_instantiated(monkeypatch: pytest.MonkeyPatch) -> None:
    from engines import cuda

    rt = FakeRuntime(end_error=0)
    monkeypatch.setattr(cuda, "_rt", lambda: rt)
    g = cuda.Graph("stream", lambda stream: None)
    assert rt.calls == ["begin", "end", "instantiate"] and g.exec == "exec"
    g.destroy()
    assert rt.calls[-2:] == ["exec_destroy", "destroy"]


class _CaptureEngine:
    def __init__(self, capturable: bool = True) -> None:
        self.capturable, self.runs = capturable, 0

    def is_stream_capturable(self, handle: int) -> bool:
        return self.capturable

    def execute(self, handle: int) -> None:
        self.runs += 1


def _standard_backend(logs: list[str]) -> Any:
    from engines.libraries import library
    from runtime.tensorrt_backend import TensorRTBackend

    b = TensorRTBackend.__new__(TensorRTBackend)
    b.library, b.cuda_graphs, b.log, b.stream = library("tensorrt"), True, logs.append, 7  # a stream handle
    return b


def test_failed_capture_falls_back_to_plain_runs_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from engines import cuda
    from koala_core.errors import KoalaError
    from runtime.tensorrt_backend import _Session

    rt = FakeRuntime()
    monkeypatch.setattr(cuda, "_rt", lambda: rt)
    logs: list[str] = []
    b = _standard_backend(logs)
    b._cuda = cuda
    eng = _CaptureEngine()

    def failing(handle: int) -> None:
        raise KoalaError("TensorRT execution failed (see the log above)")

    eng.execute = failing  # type: ignore[method-assign]
    s = _Session(engine=eng, static=True)
    assert b._capture_wanted("unet", s, 0)
    assert b._capture("unet", s) is None
    assert s.capture_failed and not b._capture_wanted("unet", s, 0)  # never tried again
    assert logs == ["warning: unet: CUDA graph capture failed (TensorRT execution failed (see the log above)); "
                    "running without a graph"]


def test_no_capture_where_the_context_says_it_cannot_be_captured() -> None:
    from runtime.tensorrt_backend import _Session

    logs: list[str] = []
    b = _standard_backend(logs)
    s = _Session(engine=_CaptureEngine(capturable=False), static=True)
    assert not b._capture_wanted("unet", s, 0) and s.capture_failed
    assert len(logs) == 1 and "cannot be captured" in logs[0]
    assert not b._capture_wanted("unet", s, 0) and len(logs) == 1


def test_tensorrt_rtx_engines_are_never_captured_by_hand() -> None:
    from engines.libraries import library
    from runtime.tensorrt_backend import _Session

    b = _standard_backend([])
    b.library = library("tensorrt-rtx")
    assert not b._capture_wanted("unet", _Session(engine=_CaptureEngine(), static=True), 0)


# ----- 5: pins, and a driver older than the runtime ------------------------------------------------

def test_gpu_packages_are_pinned_for_cuda_12() -> None:
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for pkg in ("tensorrt-cu12", "tensorrt-cu12-libs", "tensorrt-cu12-bindings", "cuda-python", "cuda-bindings"):
        assert pkg in pins, pkg
    assert pins["cuda-python"].startswith("12.") and pins["cuda-bindings"] == pins["cuda-python"]
    assert pins["tensorrt-cu12"] == pins["tensorrt-cu12-libs"] == pins["tensorrt-cu12-bindings"]
    gpu = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("gpu = "))
    assert '"tensorrt-cu12' in gpu and '"tensorrt>' not in gpu and "<13" in gpu


def test_driver_older_than_the_runtime_is_said_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    from engines import cuda
    from koala_core.errors import KoalaError

    monkeypatch.setattr(cuda, "_rt", lambda: FakeRuntime(device_error=35))
    with pytest.raises(KoalaError, match=r"driver supports CUDA 12.2, older than the CUDA runtime 12.9"):
        cuda.device_count()
    monkeypatch.setattr(cuda, "_rt", lambda: FakeRuntime(device_error=100))
    assert cuda.device_count() == 0
    monkeypatch.setattr(cuda, "_rt", lambda: FakeRuntime(device_error=0))
    assert cuda.device_count() == 1


# ----- 6: the automatic weight-streaming budget's int32 ------------------------------------------

def test_automatic_budget_is_used_where_it_cannot_have_wrapped() -> None:
    from engines.trt import automatic_streaming_budget

    budget, why = automatic_streaming_budget(600 << 20, 1 << 30, 20 << 30)
    assert budget == 600 << 20 and why == "TensorRT's automatic budget"


@pytest.mark.parametrize("reported", [-(1 << 31) + (512 << 20), 300 << 20, 2**31 - 1])
def test_automatic_budget_over_2_gib_is_replaced_by_free_memory(reported: int) -> None:
    from engines.trt import STREAMING_HEADROOM, automatic_streaming_budget

    streamable, free = 5 << 30, 4 << 30  # a full SDXL U-Net's weights: the int32 cannot hold its budget
    budget, why = automatic_streaming_budget(reported, streamable, free)
    assert budget == free - STREAMING_HEADROOM
    assert why.startswith("free device memory less 1 GiB") and str(reported) in why
    assert automatic_streaming_budget(reported, streamable, 10 << 30)[0] == streamable  # all fit: all kept
    assert automatic_streaming_budget(reported, streamable, 512 << 20)[0] == 0  # nothing free: nothing kept
