"""One way to open a pipeline on a backend (generate, bench and validate all go through here): the
artifacts' files checked, the backend opened, the sampler's assets (tokenizers, scheduler, defaults)
found, and the run size checked against what each component can run, before any network runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from exporter.manifest import Manifest, load_manifest
from koala_core.errors import KoalaError, UsageError
from runtime.backend import ONNX_BACKENDS, Backend, log_stderr, open_backend
from sampler.loop import SAMPLER_COMPONENTS, PipelineAssets


@dataclass
class OpenedPipeline:
    """An opened backend and what the sampler needs beside it; close() (or `with`) frees the backend."""

    backend: Any  # a runtime.Backend (TensorRTBackend adds .manifest, the engines manifest)
    assets: PipelineAssets
    manifest: Manifest | None  # the artifacts manifest, where --artifacts was given
    checked_bytes: int = 0  # artifact bytes checked (sha256 or size)
    verify_seconds: float = 0.0
    model: str | None = None  # --model as used (the torch backend's source)

    def check_size(self, components: Sequence[str], height: int, width: int) -> None:
        """height x width inside what the backend (an engine's profile) or the export can run, for
        each of `components`: the one size check (exporter.specs.ShapeRange.check)."""
        for c in components:
            spec = self.backend.specs.get(c) or self.assets.specs[c]
            if height <= 0 or width <= 0 or height % spec.size_multiple or width % spec.size_multiple:
                raise UsageError(f"--height/--width must be positive multiples of {spec.size_multiple} for {spec.name} "
                                 f"(got {height}x{width})")
            r = self.backend.shape_range(c)
            if r is not None:
                r.check(spec.name, spec.spatial, height, width, fix="pass --height/--width inside them")

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "OpenedPipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_pipeline(backend: str, artifacts: Path | None = None, engines: Path | None = None, model: str | None = None,
                  manifest: Manifest | None = None, components: Sequence[str] = SAMPLER_COMPONENTS,
                  threads: int | None = None, cpu_precision: str | None = None, full_hash: bool = True, model_from_artifacts: bool = False,
                  log: Callable[[str], None] | None = None, torch_precision: str = "fp32", cache: bool = False,
                  verify: bool = False) -> OpenedPipeline:
    """Check the artifacts' files (tokenizers, the scheduler's config and, for the backends that run
    the ONNX graphs, those of `components`), open backend `backend` and gather the sampler's assets:
    from the artifacts, else the torch model's source, else the engines folder.

    model_from_artifacts: --backend torch without --model builds the model the artifacts were
    exported from (bench); torch_precision "bf16" runs the torch backend under bf16 autocast (bench's
    `torch:bf16`). cache: the run caches features (sampler/feature_cache.py), so unet_deep and
    unet_shallow are checked too. full_hash without `verify` hashes only files the artifacts' record
    of verified files does not vouch for, and imports the openvino backend's compiled models on their
    record's size and mtime (exporter/artifacts_check.py); `verify` hashes everything (--verify).
    Usage errors come before any weight is read."""
    if cpu_precision is not None and backend != "openvino":
        raise UsageError(f"--cpu-precision is for --backend openvino (not {backend})")
    if backend == "openvino":
        from koala_core.machine import resolve_cpu_precision

        resolve_cpu_precision(cpu_precision)  # bf16 on a CPU without it fails before any file is read
    if backend == "tensorrt" and engines is not None:  # an engine set: the folder of the card that runs here
        from engines.engine_set import resolve_engines

        engines = resolve_engines(engines, log=log or log_stderr)
        from engines.engine_manifest import choose_library

        choose_library(engines)  # this process's TensorRT library, before anything imports Polygraphy
    if manifest is None and artifacts is not None:
        manifest = load_manifest(artifacts)
    if backend == "torch" and model is None and model_from_artifacts:
        if manifest is None:
            raise UsageError("--backend torch needs --model (or --artifacts, whose source model it then builds)")
        model = manifest.view.source.model
        if not model:
            raise UsageError(f"{manifest.root}/manifest.json records no source model; pass --model")
        if log is not None:
            log(f"torch: building {model} (the artifacts' source model)")
    t0 = time.perf_counter()
    checked = 0
    if manifest is not None:
        from exporter.artifacts_check import check_files

        prefixes = ["tokenizer/", "tokenizer_2/", str(Path(manifest.view.scheduler).parent.as_posix()) + "/"]
        if backend in ONNX_BACKENDS:
            prefixes += [f"{c}/" for c in _graph_components(manifest, components, cache)]
        hashed = [0]
        checked = check_files(manifest, prefixes, full_hash=full_hash, record=not verify, hashed=hashed)
        if log is not None:
            how = (f"verified (sha256 of {hashed[0] / 2**20:,.1f} MiB, the rest on its verified record)" if full_hash and not verify
                   else "verified (sha256)" if full_hash else "size-checked")
            log(f"artifacts {artifacts if artifacts is not None else manifest.root}: {checked / 2**20:,.1f} MiB {how} "
                f"in {time.perf_counter() - t0:.1f} s")
        assets: PipelineAssets | None = PipelineAssets.from_manifest(manifest)
    elif backend == "torch":
        from exporter.sources import resolve

        if model is None:
            raise UsageError("--backend torch needs --model (and optionally --artifacts for its tokenizers and defaults)")
        assets = PipelineAssets.from_source(resolve(model))
    else:
        assets = None  # tensorrt without --artifacts: the engines folder carries tokenizers, scheduler and defaults
    verify_s = time.perf_counter() - t0
    if backend == "tensorrt" and engines is not None and manifest is not None and log is not None:
        _report_adapters(Path(engines), manifest, log)
    runtime: Backend = open_backend(backend, artifacts=artifacts, engines=engines, model=model, manifest=manifest, threads=threads,
                                    cpu_precision=cpu_precision, torch_precision=torch_precision, verify=verify)
    try:
        if assets is None:
            em = runtime.manifest  # type: ignore[attr-defined]
            assets = PipelineAssets.from_engines(em.root, em.data, runtime.specs, {c: em.shape_range(c) for c in runtime.specs})
    except BaseException:
        runtime.close()
        raise
    return OpenedPipeline(runtime, assets, manifest, checked, verify_s, model)


def _graph_components(manifest: Manifest, components: Sequence[str], cache: bool) -> list[str]:
    """The graphs a run reads: feature caching's pair where it caches, and unet_deep in place of a
    plain unet the artifacts do not hold (`export --cache-branch B -c ...` without unet)."""
    from exporter.specs import CACHE_COMPONENTS

    have = manifest.view.components
    out = [("unet_deep" if c == "unet" and c not in have and "unet_deep" in have else c) for c in components]
    return list(dict.fromkeys([*out, *(c for c in CACHE_COMPONENTS if cache and c in have)]))  # a missing pair: the sampler's plan says so


def _report_adapters(engines: Path, manifest: Manifest, log: Callable[[str], None]) -> None:
    """Engines used with an artifacts folder: one warning line when their LoRA adapters differ."""
    from engines.engine_manifest import load_engines_manifest
    from engines.engines_record import adapter_mismatch

    try:
        record = load_engines_manifest(engines).record
    except KoalaError:  # not an engines folder: the backend says so, in its own words
        return
    line = adapter_mismatch(record.engines, {c: manifest.view.adapters(c) for c in record.engines}, f"the engines in {engines}")
    if line:
        log(f"warning: {line}")
