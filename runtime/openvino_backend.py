"""The `openvino` backend: an artifacts folder's ONNX graphs compiled by OpenVINO for this CPU, with
BF16 inference where the CPU has BF16 matrix hardware (AMX-BF16 or AVX512-BF16).

Only this module imports openvino; it never imports torch or diffusers.

Compiled models are cached with OpenVINO's own model cache (its CACHE_DIR property) in a folder beside
the artifacts, `<artifacts>.openvino-cache/<component>-<key>/`, where the key is the sha256 of the
component's files (as the manifest records them), OpenVINO's version, the CPU's feature flags, the
precision and the thread count (OpenVINO also keys the blob inside by graph and settings). Each
folder's blobs are recorded with their sha256 (`koala-cache.json`) once compiled: a folder whose blobs
do not match the record (corrupt, or left half-written) is removed and compiled again, never trusted.

In BF16, the phase of every sinusoid (the timestep and time-id embeddings) is kept in FP32: see
`keep_phases_fp32`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from exporter.artifacts_check import file_stamp
from exporter.manifest import Manifest, sha256_file
from exporter.specs import ComponentSpec, ShapeRange
from koala_core.errors import KoalaError, UsageError
from runtime.backend import Backend

CACHE_SUFFIX = ".openvino-cache"
CACHE_RECORD = "koala-cache.json"
BLOB = "compiled.blob"  # CompiledModel.export_model() of one component, imported by Core.import_model
# OpenVINO's names for the precisions of --cpu-precision.
OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise UsageError("--backend openvino needs OpenVINO: pip install 'koala-trt[openvino]'") from None
    return ov


def component_precision(spec: ComponentSpec, cpu_precision: str, asked: bool) -> str:
    """The precision a component runs at: under auto the VAE decoder keeps its FP32 policy (its error
    shows directly in pixels); an explicit --cpu-precision applies to every component."""
    if cpu_precision == "bf16" and not asked and spec.module == "vae":
        return "fp32"
    return cpu_precision


# Bumped whenever what this module changes in a graph before compiling it changes (part of the cache key).
GRAPH_EDITS = {"fp32": "none", "bf16": "phases-fp32/1"}
# Shape-only ops that the CPU plugin rebuilds as a new Reshape, dropping the new op's runtime attributes.
_RESHAPES = ("Unsqueeze", "Squeeze", "Reshape")
# A one-layer IR whose layer carries OpenVINO's "precise" attribute (DisablePrecisionConversion); the
# Python API cannot make that attribute, but can copy it from a node that has it.
_PRECISE_IR = b"""<?xml version="1.0"?><net name="precise" version="11"><layers>
<layer id="0" name="x" type="Parameter" version="opset1"><data shape="1" element_type="f32"/>
<output><port id="0" precision="FP32"><dim>1</dim></port></output></layer>
<layer id="1" name="precise" type="Relu" version="opset1"><rt_info><attribute name="precise" version="0"/></rt_info>
<input><port id="0" precision="FP32"><dim>1</dim></port></input><output><port id="1" precision="FP32"><dim>1</dim></port></output></layer>
<layer id="2" name="y" type="Result" version="opset1"><input><port id="0" precision="FP32"><dim>1</dim></port></input></layer>
</layers><edges><edge from-layer="0" from-port="0" to-layer="1" to-port="0"/><edge from-layer="1" from-port="1" to-layer="2" to-port="0"/></edges></net>"""


def phase_nodes(model: Any) -> list[Any]:
    """The Sin and Cos nodes of `model` and every non-constant node that feeds their argument."""
    found = {id(n): n for n in model.get_ops() if n.get_type_name() in ("Sin", "Cos")}
    todo = list(found.values())
    while todo:
        for port in todo.pop().inputs():
            parent = port.get_source_output().get_node()
            if parent.get_type_name() != "Constant" and id(parent) not in found:
                found[id(parent)] = parent
                todo.append(parent)
    return list(found.values())


def keep_phases_fp32(core: Any, model: Any) -> int:
    """Marks the nodes that compute a sinusoid's phase (the timestep and time-id embeddings) to stay
    FP32 under OpenVINO's BF16 inference; returns how many were marked.

    BF16 keeps 8 significant bits: a timestep of 999 becomes 1000 and 750 becomes 752, which turns the
    highest frequencies of sin(t * f) into noise. That was the U-Net's largest BF16 error (random:tiny,
    256 px, AVX512-BF16: rel L2 0.054 at t=999 against 0.013 at t=0; 0.013 at every t with this).
    The CPU plugin keeps a node in its original precision when it carries the "precise" attribute; its
    Unsqueeze-to-Reshape rewrite drops the attribute, so each chain of shape-only ops on the phase path
    is first replaced by one Reshape, which the plugin keeps as it is."""
    import openvino as ov
    import openvino.opset13 as ops

    template = next(n for n in core.read_model(_PRECISE_IR, ov.Tensor(np.zeros(0, np.uint8))).get_ops()
                    if n.get_friendly_name() == "precise")
    (key, attribute), = template.get_rt_info().items()
    for node in phase_nodes(model):
        if node.get_type_name() not in _RESHAPES:
            continue
        shape = [-1 if d.is_dynamic else d.get_length() for d in node.get_output_partial_shape(0)]
        if shape.count(-1) > 1:
            continue  # not expressible as one Reshape pattern: left as it is
        source = node.input_value(0)
        while source.get_node().get_type_name() in _RESHAPES:
            source = source.get_node().input_value(0)
        reshape = ops.reshape(source, ops.constant(np.array(shape, np.int64)), special_zero=False)
        reshape.set_friendly_name(node.get_friendly_name())
        node.output(0).replace(reshape.output(0))
    model.validate_nodes_and_infer_types()
    marked = phase_nodes(model)
    for node in marked:
        node.set_rt_info(attribute, key)
    return len(marked)


Shapes = tuple[tuple[str, tuple[int, ...]], ...]  # (input name, static shape) per input, in the spec's order


def cache_key(graph_files: dict[str, str], ov_version: str, flags: list[str], precision: str, threads: int | None,
              shapes: Shapes | None = None) -> str:
    """sha256 of what a compiled blob depends on (graph_files: path -> sha256; shapes: the static
    input shapes it was compiled for, None for the graph's own dynamic ones); one folder per key, so
    each folder holds the blob of one compile configuration."""
    doc = {"graph": dict(sorted(graph_files.items())), "openvino": ov_version, "flags": sorted(flags),
           "precision": precision, "threads": threads, "edits": GRAPH_EDITS[precision]}
    if shapes is not None:
        doc["shapes"] = [[name, list(dims)] for name, dims in shapes]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def shapes_of(spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> Shapes:
    return tuple((t.name, tuple(int(d) for d in np.shape(feeds[t.name]))) for t in spec.inputs)


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class OpenVinoBackend(Backend):
    """OpenVINO (CPU device) over an artifacts folder; components are compiled (or loaded from the
    cache) on first use or by `load`, and kept until `close`.

    With `static_shapes` (the default) each component is compiled for the input shapes it is called
    with (the graph reshaped to them: OpenVINO then plans every kernel and buffer once), on the first
    call at those shapes, and cached like any compiled model; a call at other shapes compiles (or loads)
    those and frees the previous ones, so memory holds one compiled model a component. `load` then
    imports the shapes each component ran at last, where their cache is trusted: the first call at the
    same size starts at once."""

    name = "openvino"

    def __init__(self, manifest: Manifest, threads: int | None = None, cpu_precision: str | None = None,
                 cache_dir: Path | None = None, flags: set[str] | None = None,
                 log: Callable[[str], None] = _stderr, verify: bool = False, static_shapes: bool = True) -> None:
        from koala_core.machine import SIMD_FLAGS, all_cpu_flags, cpu_isa, resolve_cpu_precision

        self.manifest = manifest
        self.specs = manifest.specs()
        self.threads = threads
        self.flags = all_cpu_flags() if flags is None else set(flags)
        self.asked = cpu_precision not in (None, "auto")
        self.precision = resolve_cpu_precision(cpu_precision, self.flags)  # usage errors before openvino loads
        self.isa = cpu_isa(self.flags)
        self.simd = [f for f in SIMD_FLAGS if f in self.flags]
        self._ov = import_openvino()
        self._core = self._ov.Core()
        self.version = self._ov.get_version()
        self.cache_root = cache_dir if cache_dir is not None else manifest.root.parent / (manifest.root.name + CACHE_SUFFIX)
        self.log = log
        self.verify = verify  # hash the compiled blobs even where their size and mtime match the record
        self._compiled: dict[str, Any] = {}
        self._requests: dict[str, Any] = {}
        self._mapped: dict[str, Any] = {}
        self.cache_hits: dict[str, bool] = {}  # component -> whether its compiled model came from the cache
        self.static_shapes = static_shapes
        self._shapes: dict[str, Shapes | None] = {}  # component -> the static shapes its compiled model takes (None: dynamic)
        self._loaded: list[str] = []  # what `load` was asked for

    # ----- precision and cache ---------------------------------------------------------------------
    def _spec(self, component: str) -> ComponentSpec:
        if component not in self.specs:
            raise UsageError(f"{self.manifest.root} has no {component} (it holds {', '.join(self.specs)})")
        return self.specs[component]

    def _onnx_path(self, component: str) -> Path:
        """The component's graph file, checked to exist (one line each where not): before compiling."""
        self._spec(component)
        path = self.manifest.onnx_path(component)
        if not path.is_file():
            raise UsageError(f"missing ONNX file {path}")
        return path

    def precision_of(self, component: str) -> str:
        return component_precision(self.specs[component], self.precision, self.asked)

    def graph_files(self, component: str) -> dict[str, str]:
        """The component's files (graph and external data) with the sha256 the manifest records."""
        folder = Path(self.manifest.component(component)["file"]).parent.as_posix() + "/"
        files = {rel: meta["sha256"] for rel, meta in self.manifest.data.get("files", {}).items() if rel.startswith(folder)}
        if not files:  # a manifest without hashes: hash the graph file itself
            path = self.manifest.onnx_path(component)
            files = {path.name: sha256_file(path)}
        return files

    def cache_dir(self, component: str, shapes: Shapes | None = None) -> Path:
        key = cache_key(self.graph_files(component), self.version, self.simd, self.precision_of(component), self.threads, shapes)
        return self.cache_root / f"{component}-{key[:24]}"

    def _last_shapes(self, component: str) -> Shapes | None:
        """The static shapes `component` was last compiled for in this cache (its newest record whose
        folder is the one those shapes key), or None."""
        found: list[tuple[int, Shapes]] = []
        for record in self.cache_root.glob(f"{component}-*/{CACHE_RECORD}"):
            try:
                doc = json.loads(record.read_text(encoding="utf-8"))
                shapes = tuple((str(n), tuple(int(d) for d in dims)) for n, dims in doc["shapes"]) if doc.get("shapes") else None
                if doc.get("component") == component and shapes is not None and self.cache_dir(component, shapes) == record.parent:
                    found.append((record.stat().st_mtime_ns, shapes))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return max(found)[1] if found else None

    def config(self, component: str) -> dict[str, Any]:
        """The properties `component` compiles with (precision, latency hint, threads)."""
        cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OV_PRECISION[self.precision_of(component)],
                               "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = int(self.threads)
        return cfg

    @staticmethod
    def _blobs(folder: Path) -> dict[str, str]:
        return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CACHE_RECORD}

    @staticmethod
    def _stats(folder: Path) -> dict[str, list[int]]:
        """Each blob's (bytes, mtime_ns, ctime_ns, inode): what the record's sha256 were taken of. A
        rewrite changes mtime and ctime (ctime cannot be set back), so a match skips the hashing."""
        return {p.name: file_stamp(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CACHE_RECORD}

    def _trusted(self, folder: Path) -> bool:
        """Whether `folder` holds blobs that match their record: the same size, mtime, ctime and inode
        as when their sha256 were recorded (with `verify`, their sha256 again); anything else there is
        removed."""
        if not folder.is_dir():
            return False
        record = folder / CACHE_RECORD
        try:
            doc = json.loads(record.read_text(encoding="utf-8"))
            recorded = doc["blobs"]
            if BLOB not in recorded:
                raise ValueError(f"written by an older koala-trt, without {BLOB}")
            if not self.verify and doc.get("stats") and doc["stats"] == self._stats(folder) and set(recorded) == set(doc["stats"]):
                return True
            blobs = self._blobs(folder)
            if blobs and recorded == blobs:
                return True
            reason = "its blobs do not match their sha256" if blobs else "it holds no blob"
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = f"no readable {CACHE_RECORD} ({_first_line(e)})"
        self.log(f"warning: openvino cache {folder} is not trusted ({reason}); compiling again")
        shutil.rmtree(folder, ignore_errors=True)
        return False

    def _record(self, component: str, folder: Path, shapes: Shapes | None = None) -> None:
        from koala_core.atomic import staged_file

        try:
            doc = {"component": component, "openvino": self.version, "isa": self.isa, "simd": self.simd,
                   "graph": self.graph_files(component), "shapes": [[n, list(d)] for n, d in shapes] if shapes else None,
                   "blobs": self._blobs(folder), "stats": self._stats(folder)}
            with staged_file(folder / CACHE_RECORD) as tmp:
                tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")
        except OSError as e:  # a read-only folder or a full disk: runs uncached next time
            self.log(f"warning: cannot record the openvino cache {folder} ({_first_line(e)})")

    def _graph(self, path: Path, component: str, shapes: Shapes | None = None) -> Any:
        """What OpenVINO compiles: the file itself in FP32; in BF16 the graph with its phases kept FP32;
        with `shapes`, reshaped to them."""
        if shapes is None and self.precision_of(component) == "fp32":
            return str(path)
        model = self.model(component)
        if shapes is not None:
            model.reshape({name: self._ov.PartialShape(list(dims)) for name, dims in shapes})
        return model

    def model(self, component: str) -> Any:
        """The ov.Model `compiled` compiles for `component` (its phases FP32 in BF16): for tools that
        compile it with properties of their own (scripts/profile_openvino.py)."""
        model = self._core.read_model(str(self.manifest.onnx_path(component)))
        if self.precision_of(component) != "fp32":
            keep_phases_fp32(self._core, model)
        return model

    def compiled(self, component: str, shapes: Shapes | None = None) -> Any:
        """The compiled model of `component` (for static `shapes`, or the graph's dynamic ones): imported
        straight from its cache folder when the record there matches (no ONNX read, no graph edit, no
        hashing of the graph by OpenVINO), else compiled from the graph and exported into the folder
        with its record. A model of other shapes held for the component is freed first."""
        if component in self._compiled and self._shapes.get(component) != shapes:
            for held in (self._requests, self._compiled, self._mapped):
                held.pop(component, None)
        if component not in self._compiled:
            path = self._onnx_path(component)
            folder = self.cache_dir(component, shapes)
            hit, model = self._trusted(folder), None
            if hit:
                try:
                    model = self._import(folder / BLOB, component)
                except Exception as e:  # OpenVINO raises RuntimeError with a long multi-line text
                    self.log(f"warning: openvino cache {folder} could not be loaded ({_first_line(e)}); compiling again")
                    shutil.rmtree(folder, ignore_errors=True)
                    hit = False
            if model is None:
                try:
                    model = self._core.compile_model(self._graph(path, component, shapes), "CPU", self.config(component))
                except Exception as e:
                    raise KoalaError(f"OpenVINO cannot compile {path}: {_first_line(e)}") from None
                self._store(component, folder, model, shapes)
            if hit and shapes is not None:
                try:  # the record's mtime says which shapes ran last (_last_shapes)
                    os.utime(folder / CACHE_RECORD)
                except OSError:
                    pass
            self.cache_hits[component] = hit
            self._shapes[component] = shapes
            self._compiled[component] = model
            self._requests[component] = model.create_infer_request()
        return self._compiled[component]

    def _import(self, blob: Path, component: str) -> Any:
        """A compiled model from its exported blob, memory-mapped (not read into a Python bytes)."""
        data = np.memmap(blob, dtype=np.uint8, mode="c")  # copy-on-write: writeable, as ov.Tensor asks, the file untouched
        self._mapped[component] = data  # OpenVINO may keep pointing into it: alive as long as the model
        return self._core.import_model(self._ov.Tensor(data, shared_memory=True), "CPU", self.config(component))

    def _store(self, component: str, folder: Path, model: Any, shapes: Shapes | None = None) -> None:
        """Export `model` into its cache folder (written under a temporary name) and record it; a
        folder that cannot be written leaves the run uncached next time, with one warning."""
        from koala_core.atomic import staged_file

        try:
            folder.mkdir(parents=True, exist_ok=True)
            with staged_file(folder / BLOB) as tmp, tmp.open("wb") as f:
                f.write(model.export_model().getbuffer())  # a BytesIO; the GIL is released while it serializes
        except (OSError, RuntimeError) as e:
            self.log(f"warning: cannot write the openvino cache {folder} ({_first_line(e)}); runs uncached next time")
            return
        self._record(component, folder, shapes)

    # ----- the Backend interface -------------------------------------------------------------------
    def load(self, components: list[str]) -> None:
        """Compile or import each component now: with static shapes, at the shapes it last ran at here
        (a component never run yet is only checked to exist, and compiled at its first call)."""
        for name in components:
            if not self.static_shapes:
                self.compiled(name)
                continue
            self._onnx_path(name)
            self._loaded.append(name)
            last = self._last_shapes(name)
            if last is not None:
                self.compiled(name, last)

    def shape_range(self, component: str) -> ShapeRange | None:
        return self.manifest.shape_range(component) if component in self.manifest.components else None

    def run_precision(self, component: str, artifact_precision: str) -> str:
        from exporter.tolerances import end_to_end_precision

        return end_to_end_precision([artifact_precision, self.precision_of(component)])

    def describe(self) -> str:
        names = dict.fromkeys([*self._compiled, *self._loaded])  # loaded: compiled at their first call (static shapes)
        used = ", ".join(f"{c} {self.precision_of(c)}{' static' if self.static_shapes else ''}" for c in names) \
            or f"{self.precision} (no models yet)"
        return f"openvino {self.version.split('-')[0]} (CPU {self.isa}; {used})"

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self._spec(component)
        spec.check_inputs(feeds)
        self.compiled(component, shapes_of(spec, feeds) if self.static_shapes else None)
        result = self._requests[component].infer({t.name: np.ascontiguousarray(feeds[t.name]) for t in spec.inputs})
        by_name = {name: value for port, value in result.items() for name in port.get_names()}
        return {t.name: np.array(by_name[t.name], copy=True) for t in spec.outputs}

    def close(self) -> None:
        self._requests.clear()
        self._compiled.clear()
        self._mapped.clear()
        self._shapes.clear()
        self._loaded.clear()
