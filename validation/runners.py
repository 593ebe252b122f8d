"""Polygraphy runners over koala-trt's runtime backends, so Polygraphy's Comparator drives the
comparison: its own ONNX Runtime runner for the onnxruntime backend (over the backend's session, so
the graph is loaded once), and a thin adapter for any other `runtime.backend.Backend` (the PyTorch
reference, TensorRT's `TensorRTBackend`). Names and dtypes come from the component spec.

Polygraphy is imported on first use, never when this module is imported: it fixes its TensorRT library
(standard or TensorRT-RTX) when first imported, and a TensorRT backend chooses the library from its
engines manifest first (engines.engine_manifest.choose_library)."""

from __future__ import annotations

import time
from collections import OrderedDict
from functools import lru_cache
from typing import Any

import numpy as np

from exporter.specs import NUMPY_DTYPES, ComponentSpec


@lru_cache(maxsize=1)
def _backend_runner_class() -> type:
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class BackendRunner(BaseRunner):
        """One component of a koala-trt backend as a Polygraphy runner (inputs/outputs by spec name)."""

        def __init__(self, backend: Any, component: str, spec: ComponentSpec, name: str) -> None:
            super().__init__(name=name)
            self.backend, self.component, self.spec = backend, component, spec

        def get_input_metadata_impl(self) -> Any:
            meta = TensorMetadata()
            for t in self.spec.inputs:
                meta.add(t.name, dtype=NUMPY_DTYPES[t.dtype], shape=[d if isinstance(d, int) else None for d in t.dims])
            return meta

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
            start = time.perf_counter()
            # Copies: a backend may hand back buffers it reuses on the next call.
            outs = {k: np.array(v, copy=True) for k, v in self.backend.run(self.component, dict(feed_dict)).items()}
            self.inference_time = time.perf_counter() - start
            return OrderedDict((t.name, outs[t.name]) for t in self.spec.outputs)

    return BackendRunner


def backend_runner(backend: Any, component: str, spec: ComponentSpec, name: str) -> Any:
    """One component of a koala-trt backend as a Polygraphy runner (Polygraphy imported here)."""
    return _backend_runner_class()(backend, component, spec, name)


def runner_for(backend: Any, component: str, spec: ComponentSpec, name: str) -> Any:
    """Polygraphy's OnnxrtRunner for ONNX Runtime (sharing the backend's session), else the adapter."""
    from runtime.backend import OnnxRuntimeBackend

    if isinstance(backend, OnnxRuntimeBackend):
        from polygraphy.backend.onnxrt import OnnxrtRunner

        return OnnxrtRunner(backend.session(component), name=name)
    return backend_runner(backend, component, spec, name)


def interface_problems(backend: Any, component: str, spec: ComponentSpec) -> list[str]:
    """Graph inputs/outputs against the spec (names and dtypes), for backends that expose a graph
    (ONNX Runtime sessions); a renamed or retyped tensor is reported, never matched by guesswork."""
    from runtime.backend import OnnxRuntimeBackend

    if not isinstance(backend, OnnxRuntimeBackend):
        return []
    sess = backend.session(component)
    onnx_types = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32", "tensor(int64)": "int64"}
    got = {a.name: onnx_types.get(a.type, a.type) for a in (*sess.get_inputs(), *sess.get_outputs())}  # type: ignore[attr-defined]
    want = {t.name: t.dtype for t in (*spec.inputs, *spec.outputs)}
    problems = [f"{n}: spec says {d}, graph has {got[n] if n in got else 'no such tensor'}" for n, d in want.items() if got.get(n) != d]
    problems += [f"{n}: not in the spec" for n in got if n not in want]
    return problems
