"""The TensorRT runtime backend: engines from a `koala-trt build` folder behind the Backend protocol
of runtime/backend.py. No torch, no diffusers: numpy, cuda-python (engines/cuda.py) and TensorRT
(engines/trt.py, the only module that calls it).

- ENGINES/manifest.json gives each component's spec (names, dtypes, shapes) and its engine's
  optimization profile; loading refuses engines built for another GPU or TensorRT version, with the
  exact rebuild command.
- Device buffers persist between calls: each I/O tensor has one buffer, allocated once and grown only
  when a larger shape arrives. An input equal to the previous call's (the prompt embeddings across
  the denoising steps) is not copied again.
- One activation buffer is shared by all engines (they run one after another on one stream), sized
  for the largest: the memory planner's resident case.
- CUDA graphs (the profile's runtime.cuda_graphs): standard TensorRT engines whose shapes are static
  replay a graph captured by hand on their first call, where the context says it is stream-capturable;
  a capture that fails is ended cleanly and the engine runs without a graph, with one warning line
  naming the first error. TensorRT-RTX engines use the library's own CUDA graphs
  (IRuntimeConfig.cuda_graph_strategy = WHOLE_GRAPH_CAPTURE, any shape), never a capture by hand.
- residency "sequential" keeps one engine on the device at a time (for cards where all do not fit).
- Streamable engines (built with WEIGHT_STREAMING, `build --weight-streaming`) get the weight budget their
  manifest records (the memory plan's, or the profile's runtime.weight_streaming_budget_gib; none recorded:
  TensorRT's automatic budget) before their context is made; the rest of their weights stream from host
  memory at every call, and the activation buffer grows by the streaming scratch.
- TensorRT-RTX engines (the manifest's library) load with `tensorrt_rtx`; the kernels the card
  JIT-compiles at first run are kept in a runtime cache beside the engines
  (runtime-cache/<component>.<gpu>.sm<cc>.driver<version>.rtx<version>.cache), so later runs start fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engines.engine_manifest import EnginesManifest, check_compatible, load_engines_manifest
from exporter.manifest import sha256_file
from exporter.specs import NUMPY_DTYPES, ComponentSpec, ShapeRange
from koala_core.errors import KoalaError, UsageError
from runtime.backend import Backend


def _log_stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def check_feed_shapes(manifest: EnginesManifest, component: str, feeds: dict[str, np.ndarray]) -> None:
    """Inputs must lie inside the engine's optimization profile: one error naming the input and limit."""
    for name, (lo, _, hi) in manifest.profile_shapes(component).items():
        shape = tuple(feeds[name].shape)
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            r = manifest.shape_range(component)
            bad = next((i for i, (s, a, b) in enumerate(zip(shape, lo, hi)) if s < a or s > b), 0)
            limit = f"dim {bad} must be {lo[bad]}..{hi[bad]}" if len(shape) == len(lo) else f"rank must be {len(lo)}"
            raise UsageError(
                f"{component}.{name}: shape {shape} is outside the engine's profile ({limit}; min {lo}, max {hi}; "
                f"built for batch {r.batch[0]}..{r.batch[2]}, {r.height[0]}..{r.height[2]} x {r.width[0]}..{r.width[2]} px "
                f"in {manifest.root}); rebuild with --batch/--height/--width or a profile whose [shapes] cover it")


@dataclass
class _Session:
    engine: Any  # engines.trt.Engine
    static: bool
    buffers: dict[str, Any] = field(default_factory=dict)  # name -> cuda.DeviceBuffer
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # input shapes set on the context
    last: dict[str, np.ndarray] = field(default_factory=dict)  # host copy of each input last uploaded
    graph: Any = None  # cuda.Graph for static shapes (standard TensorRT)
    capture_failed: bool = False  # a capture failed or was refused: this engine runs without a graph


class TensorRTBackend(Backend):
    """Runs pipeline components from an engines folder: TensorRTBackend(engines_dir)."""

    name = "tensorrt"

    def __init__(self, engines_dir: Path | str, cuda_graphs: bool | None = None, residency: str | None = None,
                 verbose: bool = False, log: Callable[[str], None] = _log_stderr) -> None:
        self.manifest: EnginesManifest = load_engines_manifest(engines_dir)
        self.specs: dict[str, ComponentSpec] = self.manifest.specs()
        from engines import trt
        from engines.build import missing_requirements
        from engines.libraries import library as get_library

        self.library = get_library(self.manifest.record.compat.library.name)
        missing = missing_requirements(self.library, run=True)
        if missing:
            raise KoalaError(f"the TensorRT backend cannot run the {self.library.name} engines of {self.manifest.root} "
                             f"on this machine, missing: {'; '.join(missing)} (the onnxruntime backend runs the "
                             "same pipeline without them)")
        trt.use_library(self.library.name)  # before anything of this process imports Polygraphy
        from engines import cuda

        self._cuda, self._trt, self.verbose, self.log = cuda, trt, verbose, log
        self.device = cuda.device_info()
        self.trt_version = trt.version()
        for warning in check_compatible(self.manifest, self.device, self.trt_version):
            log(f"warning: {warning}")
        runtime = self.manifest.data.get("profile", {}).get("runtime", {})
        self.cuda_graphs = bool(runtime.get("cuda_graphs", False)) if cuda_graphs is None else cuda_graphs
        self.residency = residency or runtime.get("residency", "resident")
        if self.residency not in ("resident", "sequential"):
            raise UsageError(f"residency must be resident or sequential (got {self.residency!r})")
        self.stream = cuda.stream_create()
        self._activations = cuda.DeviceBuffer()
        self._sessions: dict[str, _Session] = {}
        self._plans: dict[str, bytes] = {}
        self.streaming_budgets: dict[str, int] = {}  # component -> the weight-streaming budget set, in bytes
        self.uploads = self.uploads_skipped = self.graph_launches = 0
        if self.residency == "resident":
            for component in self.specs:
                self._session(component)

    # ----- loading ----------------------------------------------------------------------------
    def _plan_bytes(self, component: str) -> bytes:
        """The plan file, checked against its sha256; kept in host memory only in sequential mode
        (where it is loaded again and again)."""
        if component in self._plans:
            return self._plans[component]
        entry, path = self.manifest.entry(component), self.manifest.engine_path(component)
        if not path.is_file():
            raise KoalaError(f"{path} is missing; rebuild: {self.manifest.rebuild_command()}")
        data = path.read_bytes()
        if len(data) != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise KoalaError(f"{path} does not match its sha256 in the engines manifest (changed or corrupt); "
                             f"rebuild: {self.manifest.rebuild_command()}")
        if self.residency == "sequential":
            self._plans[component] = data
        return data

    def _refit_source(self, component: str) -> Path | None:
        entry = self.manifest.entry(component)
        if not entry.get("stripped"):
            return None
        src = entry["source"]
        onnx, root = Path(src["onnx"]), Path(src["artifacts"])
        # REFIT_IDENTICAL needs the very weights the engine was built with: every file (graph and
        # external data) must match the sha256 recorded at build time.
        for rel, meta in src.get("files", {}).items():
            p = root / rel
            if not p.is_file() or p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
                raise KoalaError(f"{component}: the weight-stripped engine is refitted from {onnx}, but {p} is missing "
                                 f"or no longer the file it was built from; rebuild: {self.manifest.rebuild_command()}")
        return onnx

    def _bind_activations(self) -> None:
        for s in self._sessions.values():
            s.engine.set_device_memory(self._activations.ptr, self._activations.nbytes)
            s.graph = self._drop_graph(s.graph)

    def _session(self, component: str) -> _Session:
        if component in self._sessions:
            return self._sessions[component]
        if self.residency == "sequential":
            for other in list(self._sessions):
                self._unload(other)
        engine = self._trt.Engine(self._plan_bytes(component), self._refit_source(component), verbose=self.verbose)
        rec = self.manifest.record.engines[component]
        if rec.streamable:
            budget = engine.set_weight_streaming_budget(rec.streaming_budget_bytes)
            self.streaming_budgets[component] = budget
            self.log(f"{component}: weight streaming, {budget / 2**20:,.0f} of {engine.streamable_weights_bytes / 2**20:,.0f} "
                     f"MiB of streamable weights kept on the device ({engine.streaming_budget_why})")
        cache = self._runtime_cache_path(component)
        engine.create_context(cache.read_bytes() if cache is not None and cache.is_file() else None,
                              cuda_graphs=self.cuda_graphs and self.library.name == "tensorrt-rtx")
        entry = self.manifest.entry(component)
        session = _Session(engine=engine, static=bool(entry.get("static")))
        self._sessions[component] = session
        if self._activations.ensure(engine.device_memory_bytes):
            self._bind_activations()
        else:
            engine.set_device_memory(self._activations.ptr, self._activations.nbytes)
        return session

    def _drop_graph(self, graph: Any) -> None:
        if graph is not None:
            graph.destroy()
        return None

    def _runtime_cache_path(self, component: str) -> Path | None:
        """TensorRT-RTX's runtime cache file of a component, keyed by GPU, driver and library version."""
        if self.library.name != "tensorrt-rtx":
            return None
        gpu = "".join(ch if ch.isalnum() else "-" for ch in self.device.name.lower()).strip("-")
        key = f"{gpu}.sm{self.device.sm}.driver{self.device.driver}.rtx{self.trt_version}"
        return self.manifest.root / "runtime-cache" / f"{component}.{key}.cache"

    def _save_runtime_cache(self, component: str, engine: Any) -> None:
        path, data = self._runtime_cache_path(component), engine.runtime_cache()
        if path is None or not data:
            return
        from koala_core.atomic import staged_file

        try:
            with staged_file(path) as tmp:
                tmp.write_bytes(data)
        except (OSError, KoalaError) as e:  # a read-only engines folder: the kernels are compiled again next time
            # KoalaError (staged_file's "not a writable folder") has no strerror; an OSError may have None.
            self.log(f"warning: cannot keep TensorRT-RTX's runtime cache in {path.parent} ({getattr(e, 'strerror', None) or e})")

    def _unload(self, component: str) -> None:
        """Free one engine's session; the runtime cache is saved first, and whatever that raises, the
        graph, buffers and engine are still freed."""
        s = self._sessions.pop(component)
        try:
            self._save_runtime_cache(component, s.engine)
        finally:
            s.graph = self._drop_graph(s.graph)
            for b in s.buffers.values():
                b.release()
            s.engine.close()

    # ----- running ----------------------------------------------------------------------------
    def shape_range(self, component: str) -> ShapeRange | None:
        return self.manifest.shape_range(component) if component in self.specs else None

    def vae_tile(self) -> int | None:
        return self.manifest.vae_tile()

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if component not in self.specs:
            raise UsageError(f"{self.manifest.root} has no {component} engine (it holds {', '.join(self.specs)})")
        spec = self.specs[component]
        spec.check_inputs(feeds)
        check_feed_shapes(self.manifest, component, feeds)
        cuda, s = self._cuda, self._session(component)
        eng = s.engine
        changed = False
        for name in eng.inputs:
            a = np.ascontiguousarray(feeds[name], dtype=eng.dtypes[name])
            if s.shapes.get(name) != a.shape:
                eng.set_input_shape(name, a.shape)
                s.shapes[name], changed = a.shape, True
            buf = s.buffers.setdefault(name, cuda.DeviceBuffer())
            if buf.ensure(a.nbytes):
                eng.set_address(name, buf.ptr)
                s.last.pop(name, None)
                changed = True
            prev = s.last.get(name)
            if prev is not None and prev.shape == a.shape and np.array_equal(prev, a):
                self.uploads_skipped += 1
            else:
                cuda.copy_htod(buf.ptr, a, self.stream)
                s.last[name] = a.copy()
                self.uploads += 1
        out_shapes = {}
        for name in eng.outputs:
            shape = eng.tensor_shape(name)
            buf = s.buffers.setdefault(name, cuda.DeviceBuffer())
            if buf.ensure(int(np.prod(shape)) * eng.dtypes[name].itemsize):
                eng.set_address(name, buf.ptr)
                changed = True
            out_shapes[name] = shape
        if changed:
            s.graph = self._drop_graph(s.graph)
        handle = cuda.stream_handle(self.stream)
        if s.graph is not None:
            s.graph.launch(self.stream)
            self.graph_launches += 1
        else:
            eng.execute(handle)  # TensorRT needs one run before a capture; its outputs are this call's
            if self._capture_wanted(component, s, handle):
                s.graph = self._capture(component, s)
        outputs = {}
        for name, shape in out_shapes.items():
            host = np.empty(shape, dtype=eng.dtypes[name])
            cuda.copy_dtoh(host, s.buffers[name].ptr, self.stream)
            outputs[name] = host
        cuda.stream_sync(self.stream)
        return {t.name: outputs[t.name].astype(NUMPY_DTYPES[t.dtype], copy=False) for t in spec.outputs}

    def _capture_wanted(self, component: str, s: _Session, handle: int) -> bool:
        """A capture by hand: standard TensorRT, cuda_graphs on, static shapes, not failed before, and a
        context that says it is stream-capturable (else one warning line, once)."""
        if not (self.cuda_graphs and s.static and not s.capture_failed and self.library.name != "tensorrt-rtx"):
            return False
        if not s.engine.is_stream_capturable(handle):
            s.capture_failed = True
            self.log(f"warning: {component}: TensorRT says this engine's context cannot be captured into a CUDA graph "
                     "on this stream; it runs without one")
            return False
        return True

    def _capture(self, component: str, s: _Session) -> Any:
        """The CUDA graph of one engine run, or None: a failed capture keeps its first error, ends the
        capture (engines/cuda.Graph) and falls back to plain execution with one warning line."""
        cuda, eng = self._cuda, s.engine
        try:
            return cuda.Graph(self.stream, lambda stream: eng.execute(cuda.stream_handle(stream)))
        except KoalaError as e:
            s.capture_failed = True
            self.log(f"warning: {component}: CUDA graph capture failed ({e}); running without a graph")
            return None

    def close(self) -> None:
        """Free every session, the activation memory and the stream, whatever any one of them raises
        (the first error is raised once all is freed)."""
        errors: list[BaseException] = []
        for component in list(getattr(self, "_sessions", {})):
            try:
                self._unload(component)
            except Exception as e:  # noqa: BLE001 - keep freeing; raised below
                errors.append(e)
        if getattr(self, "_activations", None) is not None:
            self._activations.release()
        if getattr(self, "stream", None) is not None:
            self._cuda.stream_destroy(self.stream)
            self.stream = None
        if errors:
            raise errors[0]

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
