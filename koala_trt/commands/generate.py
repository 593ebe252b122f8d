"""`koala-trt generate`: text to PNG with the numpy sampler over onnxruntime, tensorrt or torch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from koala_trt.commands.aid_options import check_vae_tile, vae_tile_option
from koala_trt.commands.common import NON_NEGATIVE, POSITIVE, check_backend_sources, check_out_file, cpu_precision_option, json_option, log, print_json, progress_option, table, threads_option
from koala_core.errors import UsageError


def _load_latents(path: Path) -> Any:
    import numpy as np

    if not path.is_file():
        raise UsageError(f"--latents: no such file {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"--latents: {path} is not a readable .npy file ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(arr, np.ndarray):
        raise UsageError(f"--latents: {path} holds several arrays (.npz); save one array with numpy.save")
    return arr


def timing_rows(summary: dict[str, Any], load_ms: float, png_ms: float, png_calls: int) -> list[list[str]]:
    def ms(v: float) -> str:
        return f"{v:,.1f}" if v >= 100 else f"{v:.3f}"

    rows = [["load (sessions/engines)", "1", ms(load_ms), ms(load_ms)]]
    for stage, v in summary["stages"].items():
        label = {"unet": "unet (per step)", "postprocess": "postprocess (to [0,1])"}.get(stage, stage)
        rows.append([label, str(v["calls"]), ms(v["total_ms"]), ms(v["per_call_ms"])])
    rows.append(["png", str(png_calls), ms(png_ms), ms(png_ms / max(png_calls, 1))])
    o = summary["overhead"]
    steps = summary["stages"].get("unet", {}).get("calls", 0)
    rows.append(["non-model overhead", "1", ms(o["total_ms"]), ms(o["total_ms"])])
    rows.append([f"  per denoising step ({o['per_step_pct_of_unet']:.3f}% of a unet step)", str(steps),
                 ms(o["per_step_ms"] * steps), ms(o["per_step_ms"])])
    rows.append(["total (tokenize..png, no load)", "1", ms(summary["total_ms"] + png_ms), ms(summary["total_ms"] + png_ms)])
    return rows


@click.command("generate")
@click.option("--artifacts", "-a", type=click.Path(path_type=Path),
              help="Artifacts folder from `koala-trt export` (tokenizers, scheduler, specs; the ONNX graphs for onnxruntime).")
@click.option("--backend", "-b", type=click.Choice(["onnxruntime", "openvino", "tensorrt", "torch"]), default="onnxruntime", show_default=True,
              help="What runs the networks.")
@click.option("--engines", type=click.Path(path_type=Path),
              help="Engines folder from `koala-trt build` (--backend tensorrt); it carries tokenizers and scheduler, so --artifacts is optional.")
@click.option("--model", "-m", help="PyTorch reference for --backend torch: hub id, diffusers folder or random:<preset>.")
@click.option("--prompt", "-p", required=True, help="What to draw.")
@click.option("--negative-prompt", "-n", default="", help="What to steer away from [default: none; zero embeddings as SDXL's force_zeros_for_empty_prompt].")
@click.option("--steps", type=POSITIVE, help="Denoising steps [default: the manifest's: 25 for KOALA, 10 for Lightning].")
@click.option("--guidance", type=float, help="Classifier-free guidance scale; <= 1 turns CFG off [default: the manifest's: 5.0, Lightning 3.5].")
@click.option("--seed", type=NON_NEGATIVE, help="Seed of the initial noise (numpy PCG64, image i uses seed+i) [default: random, printed].")
@click.option("--height", type=POSITIVE, help="Image height in pixels [default: the model's native size].")
@click.option("--width", type=POSITIVE, help="Image width in pixels [default: the model's native size].")
@click.option("--batch", type=POSITIVE, help="Images to generate [default: 1, or the --latents batch].")
@click.option("--latents", type=click.Path(path_type=Path),
              help="Initial noise as a float32 .npy [batch, 4, height/8, width/8], as diffusers' `latents=` takes it (before scaling by the initial sigma).")
@vae_tile_option()
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("koala.png"), show_default=True,
              help="PNG to write; several images get numbered names (koala-0.png, koala-1.png, ...).")
@threads_option()
@cpu_precision_option()
@click.option("--no-verify", is_flag=True, help="Check artifact file sizes only, not their sha256 (faster start for big models).")
@progress_option(expose=True)
@json_option("the result (paths, settings, timings)")
def generate_cmd(artifacts: Path | None, backend: str, engines: Path | None, model: str | None, prompt: str,
                 negative_prompt: str, steps: int | None, guidance: float | None, seed: int | None, height: int | None,
                 width: int | None, batch: int | None, latents: Path | None, vae_tile: int | None, out: Path, threads: int | None,
                 cpu_precision: str | None,
                 no_verify: bool, no_progress: bool, as_json: bool) -> None:
    """Generate images with the numpy sampler (tokenize, encode, Euler with CFG, VAE decode, PNG).

    onnxruntime and tensorrt never import torch or diffusers. Everything is validated before any
    network runs; a failure leaves no PNG behind."""
    import secrets

    from sampler.loop import Request, Sampler, output_paths, save_pngs
    from sampler.pipeline import open_pipeline

    started = time.perf_counter()
    # ----- everything is checked before a network runs -------------------------------------------
    check_out_file(out, example="image.png")
    check_vae_tile(vae_tile)
    if seed is not None and latents is not None:
        raise UsageError("--seed and --latents both set the initial noise; pass one of them")
    lat = _load_latents(latents) if latents is not None else None
    check_backend_sources(backend, artifacts, model, engines)
    pipe = open_pipeline(backend, artifacts=artifacts, engines=engines, model=model, threads=threads, cpu_precision=cpu_precision,
                         full_hash=not no_verify, log=log)
    manifest, runtime, assets, verify_s = pipe.manifest, pipe.backend, pipe.assets, pipe.verify_seconds
    try:
        if backend == "torch" and manifest is not None:
            _warn_if_other_model(runtime, manifest)
        sampler = Sampler(runtime, assets)
        if seed is None and lat is None:
            seed = secrets.randbelow(2**31)
        plan = sampler.plan(Request(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                    seed=seed if seed is not None else 0, height=height, width=width, batch=batch, latents=lat,
                                    vae_tile=vae_tile))
        paths = output_paths(out, plan.batch)
        log(f"{backend}: {plan.batch} image(s) {plan.width}x{plan.height}, {plan.steps} steps, guidance {plan.guidance:g}"
            + ("" if plan.cfg else " (no CFG)") + (f", seed {plan.seed}" if plan.seed is not None else f", latents {latents}")
            + f", scheduler {sampler.scheduler.timestep_spacing} spacing"
            + (f", VAE decode in {sampler.tile_grid(plan).describe()}" if plan.vae_tile else ""))
        # ----- load, then run ---------------------------------------------------------------------
        t0 = time.perf_counter()
        runtime.load(["text_encoder", "text_encoder_2", "unet", "vae_decoder"])
        load_ms = 1e3 * (time.perf_counter() - t0)
        backend_desc = runtime.describe()
        images, timings = sampler.sample(plan, progress=not no_progress, warn=lambda m: log(f"warning: {m}"))
        t0 = time.perf_counter()
        meta = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": str(plan.steps), "guidance": f"{plan.guidance:g}",
                "seed": str(plan.seed) if plan.seed is not None else f"latents:{latents}", "backend": backend_desc,
                "software": "koala-trt generate"}
        save_pngs(images, paths, meta)
        png_ms = 1e3 * (time.perf_counter() - t0)
    finally:
        runtime.close()
    summary = timings.summary()
    if as_json:
        print_json({"images": [str(p) for p in paths], "backend": backend_desc, "prompt": prompt, "negative_prompt": negative_prompt,
                    "seed": plan.seed, "latents": str(latents) if latents else None, "steps": plan.steps, "guidance": plan.guidance,
                    "height": plan.height, "width": plan.width, "batch": plan.batch, "vae_tile": plan.vae_tile,
                    "scheduler": {"timestep_spacing": sampler.scheduler.timestep_spacing, "timesteps": [float(t) for t in sampler.scheduler.timesteps]},  # type: ignore[union-attr]
                    "timings": {**summary, "load_ms": load_ms, "png_ms": png_ms, "verify_ms": 1e3 * verify_s,
                                "wall_ms": 1e3 * (time.perf_counter() - started)}})
        return
    for p in paths:
        click.echo(f"image: {p}")
    click.echo(table(timing_rows(summary, load_ms, png_ms, len(paths)), ["stage", "calls", "total ms", "per call ms"]))


def _warn_if_other_model(runtime: Any, manifest: Any) -> None:
    """The torch reference should be the model the artifacts came from; say so when the configs differ."""
    recorded = manifest.data.get("source", {}).get("config_sha256") or {}
    mine = runtime.source.config_sha256()
    differ = [k for k in ("text_encoder", "text_encoder_2", "unet", "vae") if k in recorded and recorded[k] != mine.get(k)]
    if differ:
        log(f"warning: --model {runtime.source.ref} differs from the artifacts' model ({manifest.data['source'].get('model')}) in {', '.join(differ)}")
