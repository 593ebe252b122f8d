"""Run a build plan: one strongly typed engine per component, written with the engines manifest.

Every TensorRT call is in engines/trt.py; this module checks what the build needs (for standard
TensorRT: the library, Polygraphy, cuda-python and a GPU of the profile's compute capability; for
TensorRT-RTX: the library and Polygraphy only, since it builds without a GPU), verifies the source
ONNX files against their recorded sha256, and writes ENGINES/ through a staging folder (nothing
half-written).
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from engines.buildplan import TIMING_CACHE, BuildPlan, ComponentBuild
from engines.cuda import DeviceInfo
from engines.engine_manifest import FORMAT, FORMAT_VERSION, MANIFEST, device_allowed, load_engines_manifest
from engines.libraries import TENSORRT, Library
from exporter.manifest import sha256_file
from koala_core.jsonfile import write_json
from koala_core import __version__
from koala_core.atomic import staged_dir
from koala_core.errors import KoalaError, UsageError
from koala_core.machine import cpu_model



# What the sampler needs beside the engines: copied so an engines folder is self-contained.
SAMPLER_FILES = ("tokenizer", "tokenizer_2", "scheduler")


def missing_requirements(library: Library = TENSORRT, run: bool = False) -> list[str]:
    """What a real build with `library` (or, with run=True, running its engines) lacks on this machine,
    checked without importing it. Running always needs cuda-python and a GPU."""
    missing = []
    if importlib.util.find_spec(library.module) is None:
        what = "TensorRT" if library is TENSORRT else "TensorRT-RTX"
        missing.append(f"{what} (the {library.module} Python package: {library.install})")
    if importlib.util.find_spec("polygraphy") is None:
        missing.append("Polygraphy (pip install polygraphy)")
    if library.builds_without_gpu and not run:
        return missing
    from engines import cuda

    if not cuda.available():
        missing.append("cuda-python (pip install cuda-python)")
    elif cuda.device_count() == 0:
        missing.append("an NVIDIA GPU visible to CUDA")
    return missing


def check_device(plan: BuildPlan, device: DeviceInfo, log: Callable[[str], None]) -> None:
    """Refuse to build for a card whose compute capability the local GPU cannot stand in for."""
    gpu, hc = plan.profile.gpu, plan.profile.build.hardware_compatibility
    if hc == "ampere_plus":
        ok = device_allowed("8.0", hc, device.compute_capability)
    else:
        ok = device.compute_capability == gpu.compute_capability
    if not ok:
        raise UsageError(f"profile {plan.profile.name} targets sm_{gpu.sm} but this GPU is {device.name} "
                         f"(sm_{device.sm}); build on the target card, pick its profile (koala-trt profiles list), "
                         "or allow it with [build] hardware_compatibility = \"ampere_plus\" (sm_80+ GPUs)")
    if gpu.names and device.name not in gpu.names:
        log(f"note: profile {plan.profile.name} names {', '.join(gpu.names)}; building on {device.name} "
            f"(same sm_{device.sm})")


def _verify_sources(plan: BuildPlan) -> None:
    for name, c in plan.components.items():
        for rel, meta in c.onnx_files.items():
            p = c.manifest.root / rel
            if not p.is_file():
                raise UsageError(f"{name}: {p} is missing; export the folder again")
            if p.stat().st_size != meta.bytes or sha256_file(p) != meta.sha256:
                raise UsageError(f"{name}: {p} does not match its sha256 in {c.manifest.root}/manifest.json "
                                 "(changed or corrupt); export it again")


def _reuse_timing_cache(out: Path, stage: Path, device: DeviceInfo, trt_version: str, log: Callable[[str], None]) -> None:
    """Keep the old folder's timing cache when it was made on this card with this TensorRT and CUDA."""
    if not (out / TIMING_CACHE).is_file() or not (out / MANIFEST).is_file():
        return
    try:
        rec = load_engines_manifest(out).record
    except KoalaError:  # an unreadable old folder: build without its cache
        return
    g, cuda_ = rec.build_host.gpu, rec.build_host.cuda or {}
    if g is not None and (g.name, g.compute_capability, rec.library.version, cuda_.get("runtime")) == \
            (device.name, device.compute_capability, trt_version, device.runtime):
        shutil.copy2(out / TIMING_CACHE, stage / TIMING_CACHE)
        log(f"reusing the timing cache of {out}")


def check_requirements(library: Library) -> None:
    missing = missing_requirements(library)
    if missing:
        raise KoalaError(f"cannot build {library.name} engines on this machine, missing: {'; '.join(missing)}. "
                         "`koala-trt build --dry-run` shows the plan without them")


def _build_gpu(library: Library, log: Callable[[str], None]) -> DeviceInfo | None:
    """The GPU a build runs on: required for standard TensorRT; for TensorRT-RTX the one present, if
    any (it is recorded, not used: the build targets the listed compute capabilities)."""
    from engines import cuda

    if not library.builds_without_gpu:
        return cuda.device_info()
    try:
        return cuda.device_info() if cuda.available() and cuda.device_count() > 0 else None
    except KoalaError as e:
        log(f"note: no usable GPU ({e}); TensorRT-RTX builds without one")
        return None


def run_build(plan: BuildPlan, force: bool = False, verbose: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build every engine of the plan into plan.out; returns the written manifest's data."""
    library = plan.library
    check_requirements(library)
    from engines import trt

    trt.use_library(library.name)
    device = _build_gpu(library, log)
    trt_version = trt.version()
    if plan.trt_version != trt_version:
        raise KoalaError(f"the plan was made for {library.name} {plan.trt_version}, this is {trt_version}")
    if device is not None and not library.builds_without_gpu:
        check_device(plan, device, log)
    if plan.out.exists() and not force:
        raise UsageError(f"{plan.out} already exists; pass --force to replace it")
    log("verifying the source ONNX files against their sha256")
    _verify_sources(plan)
    t_all = time.perf_counter()
    engines: dict[str, Any] = {}
    flags = plan.flags
    budgets = plan.streaming_budgets()
    with staged_dir(plan.out, force=force) as stage:
        if flags["timing_cache"] and device is not None:
            _reuse_timing_cache(plan.out, stage, device, trt_version, log)
        targets = ", ".join("sm_" + t.replace(".", "") for t in plan.targets)
        for i, (name, c) in enumerate(plan.components.items(), 1):
            log(f"[{i}/{len(plan.components)}] building {name} ({c.precision}, "
                f"{'static' if c.static else 'dynamic'} shapes, {library.name} for {targets}) -> {c.engine}")
            t0 = time.perf_counter()
            built = trt.build_engine(c.onnx_path, c.profile_shapes, flags,
                                     stage / TIMING_CACHE if flags["timing_cache"] else None, verbose=verbose,
                                     targets=list(plan.targets))
            seconds = time.perf_counter() - t0
            (stage / c.engine).write_bytes(built.data)
            engines[name] = engine_entry(c, len(built.data), sha256_file(stage / c.engine), built.device_memory_bytes,
                                         built.layers, {n: v["dtype"] for n, v in built.io.items()}, seconds,
                                         stripped=flags["refit"] == "REFIT_IDENTICAL+STRIP_PLAN", weights_bytes=built.weights_bytes,
                                         builder_flags=list(built.builder_flags),
                                         weight_streaming=({**budgets[name],
                                                            "streamable_weights_bytes": built.streamable_weights_bytes}
                                                           if name in budgets else None))
            log(f"  {name}: {len(built.data) / 2**20:,.1f} MiB, activations {built.device_memory_bytes / 2**20:,.1f} MiB, "
                f"{seconds:.1f} s")
        first = next(iter(plan.components.values())).manifest
        for rel in SAMPLER_FILES:
            src = first.root / rel
            if src.is_dir():
                shutil.copytree(src, stage / rel)
        data = compose_manifest(plan, device, trt_version, engines, time.perf_counter() - t_all,
                                timing_cache=(stage / TIMING_CACHE).is_file(),
                                tokenizers=[r for r in ("tokenizer", "tokenizer_2") if (stage / r).is_dir()],
                                scheduler=(stage / "scheduler").is_dir())
        write_json(stage / MANIFEST, data)
    return data


def engine_entry(c: ComponentBuild, nbytes: int, sha256: str, device_memory_bytes: int, layers: int,
                 io_dtypes: dict[str, str], seconds: float, stripped: bool,
                 weights_bytes: int | None = None, builder_flags: list[str] | None = None,
                 weight_streaming: dict[str, Any] | None = None) -> dict[str, Any]:
    """One component's record in ENGINES/manifest.json: its spec and profile (so the runtime needs no
    torch and no artifacts folder), its source ONNX and what the build measured."""
    return {
        "file": c.engine, "bytes": nbytes, "sha256": sha256, "precision": c.precision,
        "spec": c.spec.to_json(), "shape_range": c.shape_range.to_json(),
        "inputs": {n: {"min": list(a), "opt": list(b), "max": list(x)} for n, (a, b, x) in c.profile_shapes.items()},
        "static": c.static, "io_dtypes": io_dtypes, "device_memory_bytes": device_memory_bytes, "layers": layers,
        "weights_bytes": weights_bytes,  # as the builder reports them (None where it does not)
        "source": {"artifacts": str(c.manifest.root), "onnx": str(c.onnx_path), "onnx_sha256": c.onnx_sha256,
                   "onnx_bytes": c.onnx_bytes, "files": {rel: f.to_json() for rel, f in c.onnx_files.items()}},
        "stripped": stripped, "build_seconds": round(seconds, 2),
        # the LoRA adapters fused into this component's weights (the artifacts manifest's record, this component's layers)
        "loras": [a.to_json() for a in c.manifest.view.adapters(c.component)],
        **({"vae_tile": c.vae_tile} if c.vae_tile is not None else {}),  # the sampler decodes tiles of this size
        "builder_flags": builder_flags or [],  # as set on the builder's config (read back from it)
        # streamable engines: the budget the runtime sets (bytes of weights kept on the device; null: TensorRT's
        # automatic budget) and where it came from (plan | profile | automatic)
        "weight_streaming": weight_streaming or None,
    }


def compose_manifest(plan: BuildPlan, device: DeviceInfo | None, trt_version: str, engines: dict[str, Any],
                     seconds: float, timing_cache: bool = False, tokenizers: list[str] | None = None,
                     scheduler: bool = False) -> dict[str, Any]:
    """ENGINES/manifest.json: the library and its version, the target compute capabilities, the build
    host (the GPU it ran on, or none: TensorRT-RTX builds on a CPU), the flags, every engine."""
    first = next(iter(plan.components.values())).manifest
    b = plan.profile.build
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "library": {"name": plan.library.name, "version": trt_version},
        # standard TensorRT builds for the GPU it runs on; TensorRT-RTX for the capabilities it was given
        "targets": {"compute_capabilities": list(plan.targets) if plan.library.builds_without_gpu or device is None
                    else [device.compute_capability],
                    "hardware_compatibility": "none" if plan.library.builds_without_gpu else b.hardware_compatibility,
                    "version_compatible": b.version_compatible},
        "build_host": {
            "gpu": None if device is None else {"name": device.name, "compute_capability": device.compute_capability,
                                                "memory_bytes": device.memory_bytes},
            "cpu": cpu_model(),
            "cuda": None if device is None else {"runtime": device.runtime, "driver": device.driver}},
        "notes": plan.notes(),
        "koala-trt": __version__,
        "profile": plan.profile.to_json(),
        "flags": plan.flags,
        "source": first.data.get("source", {}), "sampler": first.data.get("sampler"), "vae": first.data.get("vae"),
        "tokenizers": tokenizers or [], "scheduler": "scheduler/scheduler_config.json" if scheduler else None,
        "engines": engines,
        "timing_cache": TIMING_CACHE if timing_cache else None,
        "build": {"seconds": round(seconds, 2), "args": plan.args,
                  "memory_estimate": plan.memory.to_json() if plan.memory else None},
    }
