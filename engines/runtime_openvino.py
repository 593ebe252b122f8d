"""The `openvino` backend: an artifacts folder's ONNX graphs compiled by OpenVINO for this CPU, with
BF16 inference where the CPU has BF16 matrix hardware (AMX-BF16 or AVX512-BF16).

Only this module imports openvino; it never imports torch or diffusers.

Compiled models are cached with OpenVINO's own model cache (its CACHE_DIR property) in a folder beside
the artifacts, `<artifacts>.openvino-cache/<component>-<key>/`, where the key is the sha256 of the
component's files (as the manifest records them), OpenVINO's version, the CPU's feature flags, the
precision and the thread count (OpenVINO also keys the blob inside by graph and settings). Each
folder's blobs are recorded with their sha256 (`koala-cache.json`) once compiled: a folder whose blobs
do not match the record (corrupt, or left half-written) is removed and compiled again, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engines.runtime import Backend
from exporter.manifest import Manifest, sha256_file
from exporter.specs import ComponentSpec, ShapeRange
from koala_core.errors import KoalaError, UsageError

CACHE_SUFFIX = ".openvino-cache"
CACHE_RECORD = "koala-cache.json"
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


def cache_key(graph_files: dict[str, str], ov_version: str, flags: list[str], precision: str, threads: int | None) -> str:
    """sha256 of what a compiled blob depends on (graph_files: path -> sha256); one folder per key, so
    each folder holds the blob of one compile configuration."""
    doc = {"graph": dict(sorted(graph_files.items())), "openvino": ov_version, "flags": sorted(flags),
           "precision": precision, "threads": threads}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class OpenVinoBackend(Backend):
    """OpenVINO (CPU device) over an artifacts folder; components are compiled (or loaded from the
    cache) on first use or by `load`, and kept until `close`."""

    name = "openvino"

    def __init__(self, manifest: Manifest, threads: int | None = None, cpu_precision: str | None = None,
                 cache_dir: Path | None = None, flags: set[str] | None = None,
                 log: Callable[[str], None] = _stderr) -> None:
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
        self._compiled: dict[str, Any] = {}
        self._requests: dict[str, Any] = {}
        self.cache_hits: dict[str, bool] = {}  # component -> whether its compiled model came from the cache

    # ----- precision and cache ---------------------------------------------------------------------
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

    def cache_dir(self, component: str) -> Path:
        key = cache_key(self.graph_files(component), self.version, self.simd, self.precision_of(component), self.threads)
        return self.cache_root / f"{component}-{key[:24]}"

    def _config(self, component: str) -> dict[str, Any]:
        cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OV_PRECISION[self.precision_of(component)],
                               "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": str(self.cache_dir(component))}
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = int(self.threads)
        return cfg

    @staticmethod
    def _blobs(folder: Path) -> dict[str, str]:
        return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CACHE_RECORD}

    def _trusted(self, folder: Path) -> bool:
        """Whether `folder` holds blobs that match their record; anything else there is removed."""
        if not folder.is_dir():
            return False
        record = folder / CACHE_RECORD
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))["blobs"]
            blobs = self._blobs(folder)
            if blobs and recorded == blobs:
                return True
            reason = "its blobs do not match their sha256" if blobs else "it holds no blob"
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = f"no readable {CACHE_RECORD} ({_first_line(e)})"
        self.log(f"warning: openvino cache {folder} is not trusted ({reason}); compiling again")
        shutil.rmtree(folder, ignore_errors=True)
        return False

    def _record(self, component: str, folder: Path) -> None:
        from koala_core.atomic import staged_file

        try:
            doc = {"component": component, "openvino": self.version, "isa": self.isa, "simd": self.simd,
                   "graph": self.graph_files(component), "blobs": self._blobs(folder)}
            with staged_file(folder / CACHE_RECORD) as tmp:
                tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")
        except OSError as e:  # a read-only folder or a full disk: runs uncached next time
            self.log(f"warning: cannot record the openvino cache {folder} ({_first_line(e)})")

    def compiled(self, component: str) -> Any:
        if component not in self._compiled:
            if component not in self.specs:
                raise UsageError(f"{self.manifest.root} has no {component} (it holds {', '.join(self.specs)})")
            path = self.manifest.onnx_path(component)
            if not path.is_file():
                raise UsageError(f"missing ONNX file {path}")
            folder = self.cache_dir(component)
            hit = self._trusted(folder)
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self.log(f"warning: cannot create the openvino cache {folder} ({_first_line(e)}); compiling uncached")
            config = self._config(component) if folder.is_dir() else {k: v for k, v in self._config(component).items() if k != "CACHE_DIR"}
            try:
                model = self._core.compile_model(str(path), "CPU", config)
            except Exception as e:  # OpenVINO raises RuntimeError with a long multi-line text
                if not hit:
                    raise KoalaError(f"OpenVINO cannot compile {path}: {_first_line(e)}") from None
                self.log(f"warning: openvino cache {folder} could not be loaded ({_first_line(e)}); compiling again")
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True, exist_ok=True)
                hit = False
                try:
                    model = self._core.compile_model(str(path), "CPU", config)
                except Exception as e2:
                    raise KoalaError(f"OpenVINO cannot compile {path}: {_first_line(e2)}") from None
            if not hit and folder.is_dir():
                self._record(component, folder)
            self.cache_hits[component] = hit
            self._compiled[component] = model
            self._requests[component] = model.create_infer_request()
        return self._compiled[component]

    # ----- the Backend interface -------------------------------------------------------------------
    def load(self, components: list[str]) -> None:
        for name in components:
            self.compiled(name)

    def shape_range(self, component: str) -> ShapeRange | None:
        return self.manifest.shape_range(component) if component in self.manifest.components else None

    def run_precision(self, component: str, artifact_precision: str) -> str:
        from exporter.tolerances import end_to_end_precision

        return end_to_end_precision([artifact_precision, self.precision_of(component)])

    def describe(self) -> str:
        used = ", ".join(f"{c} {self.precision_of(c)}" for c in self._compiled) or f"{self.precision} (no models yet)"
        return f"openvino {self.version.split('-')[0]} (CPU {self.isa}; {used})"

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.compiled(component)
        spec = self.specs[component]
        spec.check_inputs(feeds)
        result = self._requests[component].infer({t.name: np.ascontiguousarray(feeds[t.name]) for t in spec.inputs})
        by_name = {name: value for port, value in result.items() for name in port.get_names()}
        return {t.name: np.array(by_name[t.name], copy=True) for t in spec.outputs}

    def close(self) -> None:
        self._requests.clear()
        self._compiled.clear()
