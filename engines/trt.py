"""Every TensorRT call koala-trt makes lives in this module.

Build: NVIDIA's own path for diffusion models, through Polygraphy's Python API:
network_from_onnx_path(..., strongly_typed=True) -> CreateConfig(profiles=..., ...) ->
engine_bytes_from_network(..., save_timing_cache=...) (engine_from_network's serializing twin, so a
weight-stripped plan is written exactly as the builder made it). Networks are always strongly typed, so the same code
builds on TensorRT 10 and 11: the precision is the ONNX graph's, never BuilderFlag.FP16/INT8 or a
calibrator (removed in 11). Flags are set by name (STRONGLY_TYPED's integer changed between 10 and
11). Weight-stripped engines use REFIT_IDENTICAL with STRIP_PLAN (refitted at load from the identical
ONNX). Engines whose weights may change (a LoRA: `koala-trt refit`) use bare REFIT, which the build
plan refuses with TensorRT 11.3 (its known wrong-results issue); refit_engine refits them from a
patched ONNX file with TensorRT's ONNX parser refitter.

Two libraries, one path: standard TensorRT (`tensorrt`, datacenter cards and Jetson, builds on the
card) and TensorRT for RTX (`tensorrt_rtx`, GeForce/RTX cards): its ahead-of-time build needs no GPU
once the target compute capabilities are set explicitly; the card JIT-compiles kernels at first run.
Polygraphy drives either; it picks TensorRT-RTX when POLYGRAPHY_USE_TENSORRT_RTX=1 is set before it is
imported and reads that once, so the library is chosen once per process (use_library).

Weight streaming: CreateConfig(weight_streaming=True) sets BuilderFlag.WEIGHT_STREAMING (refused in one
line where the library lacks it); every build reads the flags back from the builder's config (no
deserialization, so TensorRT-RTX on a CPU records them too). At run time Engine.set_weight_streaming_budget
sets weight_streaming_budget_v2 before the context is made.

Run: Engine wraps a deserialized engine and one execution context through TensorRT 10's name-based
I/O API (set_input_shape, set_tensor_address, execute_async_v3). Device memory comes from the
caller (engines/cuda.py), so the activation memory can be shared between engines.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from engines.libraries import library as get_library
from koala_core.errors import KoalaError

# ONNX parser flag: TensorRT's native InstanceNormalization (the default; needed for hardware- and
# version-compatible engines, where the plugin is unavailable).
PARSER_FLAGS = ("NATIVE_INSTANCENORM",)


POLYGRAPHY_SWITCH = "POLYGRAPHY_USE_TENSORRT_RTX"
_chosen: list[str] = []  # the library this process uses, once chosen


def use_library(library: str) -> None:
    """Choose this process's TensorRT library before Polygraphy is imported (it reads the switch once)."""
    get_library(library)  # an unknown name is refused here
    if _chosen and _chosen[0] != library:
        raise KoalaError(f"this process already uses {_chosen[0]}; {library} needs a process of its own "
                         "(Polygraphy picks its TensorRT once per process)")
    want = "1" if library == "tensorrt-rtx" else "0"
    if "polygraphy.mod.trt_importer" in sys.modules and os.environ.get(POLYGRAPHY_SWITCH, "0") != want:
        raise KoalaError(f"Polygraphy was imported for the other TensorRT library before {library} was chosen; "
                         "run this in a fresh process")
    os.environ[POLYGRAPHY_SWITCH] = want
    if not _chosen:
        _chosen.append(library)


def library() -> str:
    return _chosen[0] if _chosen else "tensorrt"


def _module() -> Any:
    import importlib

    return importlib.import_module(get_library(library()).module)


def version() -> str:
    return str(_module().__version__)


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Polygraphy and TensorRT log to stdout: send it to stderr (stdout stays clean for --json)."""
    from polygraphy.logger import G_LOGGER

    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.WARNING
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        G_LOGGER.module_severity = old


def _numpy_dtype(trt_dtype: Any) -> np.dtype:
    trt = _module()

    table = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16, trt.DataType.INT32: np.int32,
             trt.DataType.INT8: np.int8, trt.DataType.BOOL: np.bool_, trt.DataType.UINT8: np.uint8}
    if hasattr(trt.DataType, "INT64"):
        table[trt.DataType.INT64] = np.int64
    if trt_dtype not in table:
        raise KoalaError(f"engine I/O of TensorRT type {trt_dtype} has no numpy equivalent")
    return np.dtype(table[trt_dtype])


@dataclass
class BuiltEngine:
    data: bytes
    device_memory_bytes: int
    layers: int
    io: dict[str, dict[str, Any]]  # name -> {"mode": "input"|"output", "dtype": numpy dtype name}
    weights_bytes: int | None = None  # as the builder's log reports them (TensorRT-RTX)
    builder_flags: tuple[str, ...] = ()  # the BuilderFlags set on the config the builder was given
    streamable_weights_bytes: int | None = None  # from the deserialized engine (standard TensorRT only)


# The builder's verbose report (TensorRT-RTX 1.7): "Total Weights Memory: 6980096 bytes".
_REPORT = {"weights_bytes": re.compile(r"Total Weights Memory: (\d+) bytes"),
           "activation_bytes": re.compile(r"Total Activation Memory: (\d+) bytes")}


def parse_build_report(log: str) -> dict[str, int | None]:
    """Weights and activation memory from the builder's verbose log (None where it does not say)."""
    out: dict[str, int | None] = {}
    for key, rx in _REPORT.items():
        found = rx.findall(log)
        out[key] = int(found[-1]) if found else None
    return out


def _check_weight_streaming(trt: Any, flags: dict[str, Any]) -> bool:
    """True when the build asks for weight streaming; a library without the flag is refused in one line."""
    if not flags.get("weight_streaming"):
        return False
    if not hasattr(trt.BuilderFlag, "WEIGHT_STREAMING"):
        what = "TensorRT-RTX" if library() == "tensorrt-rtx" else "TensorRT"
        raise KoalaError(f"weight streaming needs a {what} with BuilderFlag.WEIGHT_STREAMING (TensorRT 10.0 or newer); "
                         f"this is {what} {trt.__version__}: upgrade it, or drop build.weight_streaming / --weight-streaming")
    return True


def _flag_recorder(trt: Any, record: list[str]) -> Any:
    """A Polygraphy postprocess step that writes down every BuilderFlag set on the config the builder gets
    (read back through the config's own get_flag: no engine is deserialized, so it works without a GPU)."""
    def recorder(builder: Any, network: Any, cfg: Any) -> None:
        record[:] = sorted(name for name, flag in trt.BuilderFlag.__members__.items() if cfg.get_flag(flag))
    return recorder


def _chain(*steps: Any) -> Any:
    def run(builder: Any, network: Any, cfg: Any) -> None:
        for step in steps:
            step(builder, network, cfg)
    return run


def _rtx_targets(trt: Any, targets: list[str]) -> list[Any]:
    caps = []
    for cc in targets:
        name = "SM" + cc.replace(".", "")
        if not hasattr(trt.ComputeCapability, name):
            raise KoalaError(f"TensorRT-RTX {trt.__version__} cannot target sm_{cc.replace('.', '')}")
        caps.append(getattr(trt.ComputeCapability, name))
    return caps


def _build_rtx(onnx_path: Path, profile: Any, flags: dict[str, Any], targets: list[str], verbose: bool) -> BuiltEngine:
    """TensorRT-RTX's ahead-of-time build: no GPU, the target compute capabilities set explicitly;
    nothing is deserialized (that needs a GPU), so I/O types come from the network and the memory
    figures from the builder's verbose report."""
    trt = _module()
    from polygraphy.backend.trt import CreateConfig, PostprocessConfig, engine_bytes_from_network, network_from_onnx_path
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    caps = _rtx_targets(trt, targets)
    streaming = _check_weight_streaming(trt, flags)

    def set_targets(builder: Any, network: Any, cfg: Any) -> None:
        cfg.num_compute_capabilities = len(caps)
        for i, cap in enumerate(caps):
            cfg.set_compute_capability(cap, i)

    builder_flags: list[str] = []
    config = PostprocessConfig(CreateConfig(
        profiles=[profile], memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(flags["workspace_bytes"])},
        builder_optimization_level=int(flags["builder_optimization_level"]), weight_streaming=streaming or None),
        _chain(set_targets, _flag_recorder(trt, builder_flags)))
    old, log = G_LOGGER.module_severity, io.StringIO()
    G_LOGGER.module_severity = G_LOGGER.VERBOSE  # the memory report is verbose-level
    try:
        with contextlib.redirect_stdout(log):
            network = network_from_onnx_path(str(onnx_path), strongly_typed=True)
            data = bytes(engine_bytes_from_network(network, config=config))
            _, net, _parser = network
            io_ = {}
            for i in range(net.num_inputs):
                t = net.get_input(i)
                io_[t.name] = {"mode": "input", "dtype": _numpy_dtype(t.dtype).name}
            for i in range(net.num_outputs):
                t = net.get_output(i)
                io_[t.name] = {"mode": "output", "dtype": _numpy_dtype(t.dtype).name}
            layers = int(net.num_layers)
    except PolygraphyException as e:
        first = _first_error(log.getvalue(), e)
        hint = ("; the builder needs more scratch than the workspace cap: raise [build] workspace_gib in the profile"
                if "OutOfMemory" in first else "")
        raise KoalaError(f"TensorRT-RTX could not build {onnx_path}: {first}{hint}") from None
    finally:
        G_LOGGER.module_severity = old
        if verbose:
            sys.stderr.write(log.getvalue())
    report = parse_build_report(log.getvalue())
    return BuiltEngine(data=data, device_memory_bytes=int(report["activation_bytes"] or 0), layers=layers, io=io_,
                       weights_bytes=report["weights_bytes"], builder_flags=tuple(builder_flags))


def _first_error(log: str, e: Exception) -> str:
    """The builder's or parser's first error line, else the exception's last line (one line)."""
    for line in log.splitlines():
        if line.startswith("[E]") or "ERROR" in line[:40]:
            return line.removeprefix("[E]").strip()[:300]
    return str(e).strip().splitlines()[-1][:300]


def build_engine(onnx_path: Path, profile_shapes: dict[str, tuple[tuple[int, ...], ...]], flags: dict[str, Any],
                 timing_cache: Path | None, verbose: bool = False, targets: list[str] | None = None) -> BuiltEngine:
    """One strongly typed engine from an ONNX file with one optimization profile (min/opt/max per
    input). `flags` is BuildPlan.flags; `targets` the compute capabilities (TensorRT-RTX only)."""
    from polygraphy.backend.trt import Profile

    profile = Profile()
    for name, (lo, opt, hi) in profile_shapes.items():
        profile.add(name, min=list(lo), opt=list(opt), max=list(hi))
    if library() == "tensorrt-rtx":
        return _build_rtx(onnx_path, profile, flags, list(targets or []), verbose)
    import tensorrt as trt
    from polygraphy.backend.trt import (CreateConfig, PostprocessConfig, engine_bytes_from_network,
                                        engine_from_bytes, network_from_onnx_path)
    from polygraphy.exception import PolygraphyException

    parser_flags = [getattr(trt.OnnxParserFlag, f) for f in PARSER_FLAGS if hasattr(trt.OnnxParserFlag, f)]
    hc = flags.get("hardware_compatibility", "none")
    if hc != "none" and not hasattr(trt.HardwareCompatibilityLevel, hc.upper()):
        raise KoalaError(f"TensorRT {trt.__version__} has no hardware compatibility level {hc.upper()}")
    stripped = flags.get("refit") == "REFIT_IDENTICAL+STRIP_PLAN"
    replaceable = flags.get("refit") == "REFIT"  # weights replaceable later (koala-trt refit); not 11.3 (buildplan)
    streaming = _check_weight_streaming(trt, flags)
    config = CreateConfig(
        profiles=[profile],
        tf32=bool(flags.get("tf32", False)),
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(flags["workspace_bytes"])},
        builder_optimization_level=int(flags["builder_optimization_level"]),
        hardware_compatibility_level=getattr(trt.HardwareCompatibilityLevel, hc.upper()) if hc != "none" else None,
        version_compatible=bool(flags.get("version_compatible")) or None,
        strip_plan=stripped or None,
        load_timing_cache=str(timing_cache) if timing_cache and timing_cache.is_file() else None,
        weight_streaming=streaming or None,
    )
    steps = []
    if stripped:  # REFIT_IDENTICAL, set by name; CreateConfig's `refittable` would set bare REFIT
        steps.append(lambda builder, network, cfg: cfg.set_flag(trt.BuilderFlag.REFIT_IDENTICAL))
    elif replaceable:  # bare REFIT: the engine may get other weights (a LoRA patched into the ONNX)
        steps.append(lambda builder, network, cfg: cfg.set_flag(trt.BuilderFlag.REFIT))
    builder_flags: list[str] = []
    config = PostprocessConfig(config, _chain(*steps, _flag_recorder(trt, builder_flags)))
    try:
        with _quiet(verbose):
            network = network_from_onnx_path(str(onnx_path), flags=parser_flags or None, strongly_typed=True)
            # The builder's serialized plan as is (a weight-stripped plan stays stripped), then deserialized
            # once to read what the engine needs at run time.
            data = bytes(engine_bytes_from_network(network, config=config,
                                                   save_timing_cache=str(timing_cache) if timing_cache else None))
            engine = engine_from_bytes(data)
    except PolygraphyException as e:
        raise KoalaError(f"TensorRT could not build {onnx_path}: {str(e).strip().splitlines()[-1][:300]}") from None
    io = {}
    for i in range(engine.num_io_tensors):
        n = engine.get_tensor_name(i)
        io[n] = {"mode": "input" if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else "output",
                 "dtype": _numpy_dtype(engine.get_tensor_dtype(n)).name}
    mem = getattr(engine, "device_memory_size_v2", None) or getattr(engine, "device_memory_size", 0)
    streamable = getattr(engine, "streamable_weights_size", None) if streaming else None
    return BuiltEngine(data=data, device_memory_bytes=int(mem), layers=int(engine.num_layers), io=io,
                       builder_flags=tuple(builder_flags), streamable_weights_bytes=None if streamable is None
                       else int(streamable))


INT32_MAX = 2**31 - 1
STREAMING_HEADROOM = 1 << 30  # device memory left free by a budget of our own (activations, other engines)


def automatic_streaming_budget(reported: int, streamable: int, free_bytes: int) -> tuple[int, str]:
    """The weight-streaming budget when none is recorded, and how it was chosen (one line's words).
    TensorRT's get_weight_streaming_automatic_budget() goes through an int32 in the Python binding, so a
    budget of 2 GiB or more (a full SDXL U-Net) comes back wrapped (negative, or small and wrong). So it
    is used only where it cannot have wrapped (the engine streams less than 2 GiB); otherwise the budget
    is our own: the streamable weights that fit in the free device memory less STREAMING_HEADROOM."""
    if 0 <= reported and streamable <= INT32_MAX:  # every budget up to `streamable` fits the int32
        return min(reported, streamable), "TensorRT's automatic budget"
    own = max(0, min(streamable, free_bytes - STREAMING_HEADROOM))
    return own, (f"free device memory less {STREAMING_HEADROOM >> 30} GiB (TensorRT's automatic budget comes through "
                 f"an int32 and cannot be trusted for {streamable / 2**30:.1f} GiB of streamable weights; it said {reported})")


def configure_rtx_runtime(config: Any, trt: Any, cuda_graphs: bool) -> None:
    """TensorRT-RTX's runtime config: activation memory from the caller (USER_MANAGED, shared between
    engines) and, with cuda_graphs, the library's own CUDA graphs (cuda_graph_strategy =
    WHOLE_GRAPH_CAPTURE), which capture after the shape-specialized kernels are JIT-compiled for each
    shape. koala-trt does not capture TensorRT-RTX engines by hand: stream capture of them needs
    BuilderFlag.REQUIRE_USER_ALLOCATION at build and a context that is_stream_capturable, and the
    library's strategy needs neither."""
    config.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE if cuda_graphs else trt.CudaGraphStrategy.DISABLED
    config.cuda_graph_strategy = strategy


@dataclass
class Refitted:
    data: bytes  # the refitted engine, serialized
    weights: int  # refittable weights the engine has (all set from the ONNX file)


def refit_engine(data: bytes, onnx_path: Path, verbose: bool = False) -> Refitted:
    """Refit a refittable (bare REFIT) engine with every weight of `onnx_path`, an ONNX file of the
    same graph whose initializers changed (`koala-trt lora`), and serialize it again. Polygraphy
    loads and serializes; TensorRT's OnnxParserRefitter maps initializers to the engine's weights by
    the names the parser gave them at build time. Needs the GPU the engine runs on."""
    trt = _module()
    from polygraphy.backend.trt import bytes_from_engine, engine_from_bytes
    from polygraphy.backend.trt.util import get_trt_logger
    from polygraphy.exception import PolygraphyException

    try:
        with _quiet(verbose):
            engine = engine_from_bytes(data)
    except PolygraphyException as e:
        raise KoalaError(f"TensorRT could not load the engine: {str(e).strip().splitlines()[-1][:300]}") from None
    if not engine.refittable:
        raise KoalaError("the engine is not refittable (built without refit = \"weights\" in its profile)")
    logger = get_trt_logger()
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    with _quiet(verbose):
        loaded = parser_refitter.refit_from_file(str(onnx_path))
    errors = [str(parser_refitter.get_error(i).desc()) for i in range(parser_refitter.num_errors)]
    if not loaded:
        raise KoalaError(f"TensorRT could not read the weights of {onnx_path} for the engine: "
                         f"{errors[0][:300] if errors else 'the graph does not match the engine'}")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise KoalaError(f"{onnx_path} lacks {len(missing)} weight(s) the engine needs, e.g. {missing[0]}: "
                         "it is not the graph the engine was built from")
    with _quiet(verbose):
        if not refitter.refit_cuda_engine():
            raise KoalaError(f"TensorRT could not refit the engine from {onnx_path} (see the log above)")
    weights = len(refitter.get_all_weights())
    return Refitted(bytes(bytes_from_engine(engine)), weights)


class Engine:
    """A deserialized engine and its one execution context; activation memory supplied by the caller."""

    def __init__(self, data: bytes, refit_onnx: Path | None = None, verbose: bool = False) -> None:
        trt = _module()  # tensorrt or tensorrt_rtx, as use_library chose
        from polygraphy.backend.trt import engine_from_bytes
        from polygraphy.exception import PolygraphyException

        self._trt = trt
        try:
            with _quiet(verbose):
                self.engine = engine_from_bytes(data)  # also allows version-compatible host code
        except PolygraphyException as e:
            raise KoalaError(f"TensorRT could not load the engine: {str(e).strip().splitlines()[-1][:300]}") from None
        if refit_onnx is not None:
            self._refit(refit_onnx)
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.dtypes = {n: _numpy_dtype(self.engine.get_tensor_dtype(n)) for n in self.names}
        self.device_memory_bytes = int(getattr(self.engine, "device_memory_size_v2", None)
                                       or getattr(self.engine, "device_memory_size", 0))
        self.context: Any = None

    def set_weight_streaming_budget(self, budget_bytes: int | None) -> int:
        """For a streamable engine, before create_context: keep `budget_bytes` of its streamable weights on
        the device (None: TensorRT's automatic budget), at most all of them; the rest streams from host
        memory at every call. Returns the budget set; the activation size then includes the streaming scratch."""
        total = int(self.engine.streamable_weights_size)
        if budget_bytes is None:
            from engines import cuda

            want, self.streaming_budget_why = automatic_streaming_budget(
                int(self.engine.get_weight_streaming_automatic_budget()), total, cuda.mem_info()[0])
        else:
            want, self.streaming_budget_why = max(0, min(int(budget_bytes), total)), "the manifest's budget"
        self.engine.weight_streaming_budget_v2 = want
        if int(self.engine.weight_streaming_budget_v2) != want:
            raise KoalaError(f"TensorRT did not accept a weight-streaming budget of {want} bytes")
        self.device_memory_bytes = int(self.engine.device_memory_size_v2)
        return want

    @property
    def streamable_weights_bytes(self) -> int:
        return int(getattr(self.engine, "streamable_weights_size", 0))

    def _refit(self, onnx_path: Path) -> None:
        """Weight-stripped plans get their weights back from the identical ONNX file they were built from."""
        trt = self._trt
        logger = trt.Logger(trt.Logger.WARNING)
        refitter = trt.Refitter(self.engine, logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, logger)
        if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
            raise KoalaError(f"could not refit the weight-stripped engine from {onnx_path}")

    def create_context(self, runtime_cache: bytes | None = None, cuda_graphs: bool = False) -> None:
        """An execution context whose activation memory the caller provides (set_device_memory). With
        TensorRT-RTX, a runtime cache (its JIT-compiled kernels) is attached: loaded from
        `runtime_cache` when it suits this GPU, driver and version, else started empty; and with
        `cuda_graphs` the library captures and replays CUDA graphs itself (configure_rtx_runtime)."""
        trt = self._trt
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        self._cache, self.cache_loaded = None, False
        if library() == "tensorrt-rtx":
            config = self.engine.create_runtime_config()
            configure_rtx_runtime(config, trt, cuda_graphs)
            self._cache = config.create_runtime_cache()
            if runtime_cache:  # rejected (False) when made on another GPU, driver or TensorRT-RTX
                self.cache_loaded = bool(self._cache.deserialize(runtime_cache))
            config.set_runtime_cache(self._cache)
            self._config = config  # the context refers to it: keep it alive
            self.context = self.engine.create_execution_context(config)
        elif strategy is not None:
            self.context = self.engine.create_execution_context(strategy.USER_MANAGED)
        else:  # pragma: no cover - TensorRT < 10
            self.context = self.engine.create_execution_context_without_device_memory()
        if self.context is None:
            raise KoalaError("TensorRT could not create an execution context (out of device memory?)")

    def runtime_cache(self) -> bytes | None:
        """TensorRT-RTX's runtime cache as bytes (the kernels compiled so far); None with TensorRT."""
        cache = getattr(self, "_cache", None)
        return None if cache is None else bytes(cache.serialize())

    def set_device_memory(self, ptr: int, size: int) -> None:
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(ptr, size)
        else:  # TensorRT 10.0
            self.context.device_memory = ptr

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, tuple(shape)):
            raise KoalaError(f"TensorRT rejected shape {tuple(shape)} for input {name}")

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.context.get_tensor_shape(name))

    def set_address(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise KoalaError(f"TensorRT rejected the device address of {name}")

    def is_stream_capturable(self, stream_handle: int) -> bool:
        """Whether this context's work may be captured into a CUDA graph on that stream (TensorRT 10.x
        and TensorRT-RTX ask the context; a library without the call is taken at its word: True)."""
        probe = getattr(self.context, "is_stream_capturable", None)
        return True if probe is None else bool(probe(stream_handle))

    def execute(self, stream_handle: int) -> None:
        if not self.context.execute_async_v3(stream_handle):
            raise KoalaError("TensorRT execution failed (see the log above)")

    def close(self) -> None:
        self.context = None
        self._cache = self._config = None
        self.engine = None
