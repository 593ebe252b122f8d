"""The few CUDA runtime calls koala-trt needs (device query, memory, streams, graphs), through
NVIDIA's cuda-python bindings (`cuda.bindings.runtime`, or `cuda.cudart` in older releases).
No torch. cuda-python is imported on first use, so this module imports anywhere.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from koala_core.errors import KoalaError


@dataclass(frozen=True)
class DeviceInfo:
    """The local GPU as the engines manifest records it."""

    name: str
    compute_capability: str  # "8.6"
    memory_bytes: int
    driver: str = ""  # CUDA driver API version, e.g. "12.8"
    runtime: str = ""  # CUDA runtime version, e.g. "12.6"
    index: int = 0

    @property
    def sm(self) -> str:
        return self.compute_capability.replace(".", "")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def available() -> bool:
    return importlib.util.find_spec("cuda") is not None and (
        importlib.util.find_spec("cuda.bindings") is not None or importlib.util.find_spec("cuda.cudart") is not None)


def _rt() -> Any:
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt  # cuda-python < 12.6
        except ImportError:
            raise KoalaError("CUDA runtime bindings missing: pip install cuda-python (koala-trt[gpu])") from None
    return rt


def _check(result: Any) -> Any:
    """cuda-python returns (error, value...) tuples: raise on an error, return the value(s)."""
    rt = _rt()
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        raise KoalaError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def device_count() -> int:
    """GPUs CUDA sees: 0 where there is none (cudaErrorNoDevice); a driver too old for the CUDA runtime
    cuda-python was built for is not "no GPU" but a KoalaError saying so, with both versions."""
    rt = _rt()
    err, n = rt.cudaGetDeviceCount()
    if err == rt.cudaError_t.cudaSuccess:
        return int(n)
    if err == getattr(rt.cudaError_t, "cudaErrorInsufficientDriver", None):
        driver = _version(int(rt.cudaDriverGetVersion()[1] or 0))
        runtime = _version(int(rt.cudaRuntimeGetVersion()[1] or 0))
        raise KoalaError(f"the NVIDIA driver supports CUDA {driver}, older than the CUDA runtime {runtime} of cuda-python: "
                         "upgrade the driver, or install the cuda-python pinned in constraints.txt (CUDA 12, driver r535 or newer)")
    return 0


def device_info(index: int = 0) -> DeviceInfo:
    rt = _rt()
    _check(rt.cudaSetDevice(index))
    prop = _check(rt.cudaGetDeviceProperties(index))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(name=name.rstrip("\x00"), compute_capability=f"{prop.major}.{prop.minor}",
                      memory_bytes=int(prop.totalGlobalMem), driver=_version(_check(rt.cudaDriverGetVersion())),
                      runtime=_version(_check(rt.cudaRuntimeGetVersion())), index=index)


def mem_info() -> tuple[int, int]:
    """(free, total) device bytes."""
    free, total = _check(_rt().cudaMemGetInfo())
    return int(free), int(total)


def malloc(nbytes: int) -> int:
    return int(_check(_rt().cudaMalloc(max(1, int(nbytes)))))


def free(ptr: int) -> None:
    if ptr:
        _check(_rt().cudaFree(ptr))


def stream_create() -> Any:
    return _check(_rt().cudaStreamCreate())


def stream_handle(stream: Any) -> int:
    return int(stream)


def stream_sync(stream: Any) -> None:
    _check(_rt().cudaStreamSynchronize(stream))


def stream_destroy(stream: Any) -> None:
    _check(_rt().cudaStreamDestroy(stream))


def copy_htod(dst: int, src: np.ndarray, stream: Any) -> None:
    rt = _rt()
    _check(rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))


def copy_dtoh(dst: np.ndarray, src: int, stream: Any) -> None:
    rt = _rt()
    _check(rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))


class Graph:
    """A CUDA graph captured from the work `enqueue(stream)` puts on a stream, replayed with launch()."""

    def __init__(self, stream: Any, enqueue: Any) -> None:
        rt = _rt()
        self.graph = self.exec = None
        _check(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        try:
            enqueue(stream)
        except BaseException:
            # The capture's own error is the one to report: end the capture (its status, likely
            # cudaErrorStreamCaptureInvalidated, says nothing new), drop what it made, re-raise.
            graph = _end_capture_quietly(rt, stream)
            if graph is not None:
                rt.cudaGraphDestroy(graph)
            raise
        self.graph = _check(rt.cudaStreamEndCapture(stream))
        try:
            self.exec = _check(rt.cudaGraphInstantiate(self.graph, 0))
        except BaseException:
            self.destroy()
            raise

    def launch(self, stream: Any) -> None:
        _check(_rt().cudaGraphLaunch(self.exec, stream))

    def destroy(self) -> None:
        rt = _rt()
        if getattr(self, "exec", None) is not None:
            rt.cudaGraphExecDestroy(self.exec)
            self.exec = None
        if getattr(self, "graph", None) is not None:
            rt.cudaGraphDestroy(self.graph)
            self.graph = None


def _end_capture_quietly(rt: Any, stream: Any) -> Any:
    """End a stream capture whatever its state; the graph it made, or None (its error is not raised)."""
    try:
        result = rt.cudaStreamEndCapture(stream)
    except Exception:  # noqa: BLE001 - the caller re-raises the error that matters
        return None
    err, graph = (result[0], result[1]) if isinstance(result, tuple) and len(result) > 1 else (result, None)
    return graph if err == rt.cudaError_t.cudaSuccess else None


class DeviceBuffer:
    """Device memory that grows on demand and is kept between calls."""

    def __init__(self) -> None:
        self.ptr, self.nbytes = 0, 0

    def ensure(self, nbytes: int) -> bool:
        """Make room for nbytes; True when the address changed (callers rebind it)."""
        if nbytes <= self.nbytes and self.ptr:
            return False
        self.release()
        self.ptr, self.nbytes = malloc(nbytes), max(1, int(nbytes))
        return True

    def release(self) -> None:
        if self.ptr:
            free(self.ptr)
        self.ptr, self.nbytes = 0, 0
