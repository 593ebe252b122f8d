"""`koala-trt export`: every component to ONNX, each checked against PyTorch, into one folder."""

from __future__ import annotations

import gc
import json
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from exporter.check import compare, fp32_tolerance, onnx_outputs, torch_outputs
from exporter.manifest import FORMAT, FORMAT_VERSION, Manifest, file_record, hash_tree
from exporter.metrics import Tolerance
from exporter.sources import ModelSource
from exporter.specs import (CACHE_COMPONENTS, CHUNK_TOKENS, DEFAULT_COMPONENTS, DEFAULT_PROMPT_CHUNKS, ComponentSpec, ShapeRange,
                            default_range, specs_from_configs)
from koala_core.atomic import staged_dir
from koala_core.errors import CheckFailed, UsageError
from koala_core.meter import Meter, process_peak_rss_mb

Log = Callable[[str], None]


@dataclass
class ExportOptions:
    components: list[str] = field(default_factory=lambda: list(DEFAULT_COMPONENTS))
    opset: int = 18
    batch: int = 2
    height: int | None = None  # default: the model's native size (U-Net sample_size x VAE factor)
    width: int | None = None
    check: bool = True
    check_size: int | None = None  # image side spatial components are checked at [U-Net 512, VAE 256, at most the export size]
    tolerance: Tolerance | None = None  # default: exporter.check.fp32_tolerance(component)
    force: bool = False
    static: bool = False  # fixed shapes (batch, height, width): faster to export, runs at that shape only
    loras: list[Any] = field(default_factory=list)  # exporter.lora.Adapter, fused in order before export
    max_prompt_chunks: int | None = None  # the U-Net's sequence range: 1..N chunks of 77 tokens [DEFAULT_PROMPT_CHUNKS]
    cache_branch: int | None = None  # feature caching: also unet_deep and unet_shallow split at this branch (exporter/cache_branch.py)


def tool_versions() -> dict[str, str]:
    from koala_core.machine import versions

    return versions(("koala-trt", "torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu"))


def _validate(source: ModelSource, specs: dict[str, ComponentSpec], opts: ExportOptions) -> tuple[int, int]:
    height = source.default_size if opts.height is None else opts.height
    width = source.default_size if opts.width is None else opts.width
    if opts.batch < 1:
        raise UsageError("--batch must be at least 1")
    if opts.max_prompt_chunks is not None and not 1 <= opts.max_prompt_chunks <= 16:
        raise UsageError(f"--max-prompt-chunks must be between 1 and 16 (got {opts.max_prompt_chunks})")
    if opts.static and opts.max_prompt_chunks is not None:
        raise UsageError("--max-prompt-chunks does not apply with --static (a static U-Net takes one chunk of 77 tokens)")
    if not 7 <= opts.opset <= 23:
        raise UsageError(f"--opset {opts.opset} is outside what the exporter supports (7..23; 17+ recommended)")
    missing = [n for n in opts.components if n not in specs]
    if missing:  # the ControlNet pair exists only with a ControlNet (exporter/controlnet.py)
        raise UsageError(f"{', '.join(missing)}: export a ControlNet with --controlnet DIR_OR_HUB_ID (or `random:`)")
    for name in opts.components:
        specs[name].check_size(height, width)
    if opts.loras:
        from exporter.lora import check_adapters, layer_weights

        modules = {specs[n].module for n in opts.components}
        check_adapters(opts.loras, {m: layer_weights(source.build(m, device="meta")) for m in modules})
    return height, width


# Default check sides: a VAE decode costs about 8x a U-Net step per pixel on a CPU (16 s for one 512 px
# image here), so the VAE is checked at 256 px; `validate` checks every component at full resolution.
CHECK_SIDE = {"unet": 512, "unet_deep": 512, "unet_shallow": 512, "vae_decoder": 256, "vae_encoder": 256}


def check_shape(spec: ComponentSpec, batch: int, height: int, width: int, side: int | None) -> tuple[int, int, int]:
    """(batch, height, width) a component is checked at: the VAE at batch 1 (it decodes images, not the
    CFG batch), spatial sides capped by CHECK_SIDE or --check-size, in the spec's granularity."""
    b = 1 if spec.module == "vae" else batch
    m = spec.size_multiple
    if side is not None:
        spec.check_size(side, side)
        return b, side, side
    cap = CHECK_SIDE.get(spec.name, 512)
    return b, max(m, min(height, cap) // m * m), max(m, min(width, cap) // m * m)


def copy_runtime_files(source: ModelSource, out: Path) -> None:
    """Tokenizers (with tokenizer.json, which the torch-free runtime reads) and the scheduler config."""
    from transformers import CLIPTokenizer

    for src, name in zip(source.tokenizer_dirs(), ("tokenizer", "tokenizer_2")):
        if (Path(src) / "tokenizer.json").is_file() and source.kind == "preset":
            shutil.copytree(src, out / name)
        else:  # re-save through transformers so tokenizer.json exists
            CLIPTokenizer.from_pretrained(str(src)).save_pretrained(str(out / name))
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(source.scheduler_config, indent=2) + "\n")


def export(source: ModelSource, out: Path, opts: ExportOptions, log: Log = print) -> Manifest:
    from exporter.onnx_export import export_onnx
    from exporter.wrappers import wrap

    specs = specs_from_configs(source.configs, opts.cache_branch or 0)  # an unknown branch: UsageError here
    if opts.cache_branch is not None:
        opts.components += [c for c in CACHE_COMPONENTS if c not in opts.components]
    height, width = _validate(source, specs, opts)
    log(f"exporting {source.ref} ({', '.join(opts.components)}) to {out}")
    trace_batch = opts.batch if opts.static else max(2, opts.batch)  # torch.export specializes a batch of 1
    started = time.perf_counter()
    components: dict[str, Any] = {}
    failed: list[str] = []
    with staged_dir(out, force=opts.force) as stage, ThreadPoolExecutor(max_workers=1) as hasher:
        # sha256 of each component's files runs in a thread (hashlib releases the GIL) while the next
        # component exports: ~6 GB of full-size graphs hash in ~10 s that would otherwise add up.
        hashes: dict[str, Future[dict[str, Any]]] = {}
        by_module: dict[str, list[str]] = {}
        for name in opts.components:
            by_module.setdefault(specs[name].module, []).append(name)
        step = 0
        for module_name, names in by_module.items():
            with Meter() as load:
                module = source.build(module_name)
            params = sum(p.numel() for p in module.parameters())
            log(f"loaded {module_name} ({params / 1e6:,.1f}M parameters) in {load.seconds:.1f} s")
            if opts.loras:
                from exporter.lora import fuse

                log(f"      fused {fuse(module, module_name, opts.loras)} LoRA layer weight(s) into the {module_name}")
            references: dict[str, tuple[dict, dict]] = {}
            for name in names:
                step += 1
                spec = specs[name]
                rng = default_range(spec, opts.batch, height, width, opts.max_prompt_chunks or DEFAULT_PROMPT_CHUNKS)
                if opts.static:
                    rng = ShapeRange(*(((v,) * 3) for v in (opts.batch, height, width)),
                                     prompt_chunks=(1, 1, 1) if spec.has_sequence else None)
                path = stage / name / "model.onnx"
                log(f"[{step}/{len(opts.components)}] {name}: exporting (opset {opts.opset}, batch {rng.batch[0]}..{rng.batch[2]}"
                    + (f", {rng.height[0]}..{rng.height[2]} x {rng.width[0]}..{rng.width[2]} px" if spec.spatial else "")
                    + (f", prompt {rng.prompt_chunks[0] * CHUNK_TOKENS}..{rng.prompt_chunks[2] * CHUNK_TOKENS} tokens"
                       if rng.prompt_chunks else "") + ")")
                with Meter() as m:
                    stats = export_onnx(spec, module, path, trace_batch, height, width, rng, opts.opset, opts.static)
                for f in sorted(path.parent.iterdir()):
                    hashes[f.relative_to(stage).as_posix()] = hasher.submit(file_record, f)
                log(f"      {stats.nodes_after:,} nodes ({stats.nodes_before:,} before cleanup), {stats.bytes / 2**20:,.1f} MiB"
                    + (" with external data" if stats.external_data else "") + f", {m.seconds:.1f} s, peak RSS {m.peak_rss_mb / 1024:.2f} GiB")
                components[name] = {
                    "file": f"{name}/model.onnx", "precision": "fp32", "spec": spec.to_json(), "shape_range": rng.to_json(),
                    "parameters": params,
                    "export": {"batch": opts.batch, "height": height, "width": width, "opset": opts.opset, "static": opts.static,
                               "nodes_before_cleanup": stats.nodes_before, "nodes": stats.nodes_after,
                               "external_data": stats.external_data, "bytes": stats.bytes,
                               "seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak_rss_mb, 1)},
                }
                if opts.check:
                    cb, ch, cw = (opts.batch, height, width) if opts.static else check_shape(spec, opts.batch, height, width, opts.check_size)
                    # A sequence axis is checked at its longest prompt: more than one chunk where the range allows.
                    feeds = spec.dummy_inputs(cb, ch, cw, seed=2, chunks=rng.max_prompt_chunks)
                    with Meter() as m:
                        references[name] = (feeds, torch_outputs(spec, wrap(spec, module), feeds))
                    components[name]["check"] = {"torch_seconds": round(m.seconds, 2)}
            del module
            gc.collect()
            for name, (feeds, ref) in references.items():
                spec = specs[name]
                with Meter() as m:
                    result = compare(spec, ref, onnx_outputs(spec, stage / name / "model.onnx", feeds), feeds,
                                     opts.tolerance or fp32_tolerance(name))
                gc.collect()
                components[name]["check"].update(result.to_json(), ort_seconds=round(m.seconds, 2), peak_rss_mb=round(m.peak_rss_mb, 1))
                if result.passed:
                    log(f"      {name}: ONNX Runtime matches PyTorch ({result.summary()})")
                else:
                    log(f"      {name}: MISMATCH: {result.failure_message()}")
                    failed.append(result.failure_message())
        if failed:
            raise CheckFailed("export check failed: " + "; ".join(failed))
        copy_runtime_files(source, stage)
        manifest = Manifest(stage, {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"model": source.ref, "kind": source.kind, "description": source.description,
                       "vae": str(source.vae_path) if source.vae_path else None,
                       "config_sha256": source.config_sha256(),
                       **({"controlnet": source.controlnet} if source.controlnet else {})},
            "configs": {k: source.configs[k] for k in ("unet", "vae", "controlnet") if k in source.configs},
            "sampler": {"steps": source.sampler.steps, "guidance": source.sampler.guidance,
                        "height": source.default_size, "width": source.default_size},
            "vae": {"scaling_factor": float(source.configs["vae"].get("scaling_factor", 0.18215)),
                    "scale_factor": source.vae_scale_factor},
            "tokenizers": ["tokenizer", "tokenizer_2"], "scheduler": "scheduler/scheduler_config.json",
            "opset": opts.opset, "versions": tool_versions(),
            **({"loras": [a.record() for a in opts.loras]} if opts.loras else {}),
            "components": components,
            "export": {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(process_peak_rss_mb(), 1)},
        })
        files = {rel: fut.result() for rel, fut in hashes.items()}
        manifest.data["files"] = {**hash_tree(stage, skip=("manifest.json", *files)), **files}
        manifest.data["files"] = dict(sorted(manifest.data["files"].items()))
        manifest.save()
    manifest.root = out
    return manifest
