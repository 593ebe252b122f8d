"""`koala-trt generate`: text to PNG with the numpy sampler over onnxruntime, tensorrt or torch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from koala_trt.commands.aid_options import check_vae_tile, vae_tile_option
from koala_trt.commands.image_options import image_args as image_args_of, image_options
from koala_trt.commands.cache_options import cache_options, cache_record
from koala_trt.commands.common import NON_NEGATIVE, POSITIVE, check_backend_sources, check_out_file, cpu_precision_option, json_option, log, print_json, progress_option, table, threads_option
from koala_trt.commands.scheduler_option import check_scheduler, scheduler_option
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


def _read_control_image(path: Path | None, scale: float | None, start: float | None, end: float | None) -> Any:
    """--control-image as a decoded PIL image (a truncated or non-image file is one line, before any model work)."""
    if path is None:
        if scale is not None or start is not None or end is not None:
            raise UsageError("--controlnet-scale / --control-guidance-start / --control-guidance-end need --control-image")
        return None
    from sampler.controlnet import to_pil

    if not path.is_file():
        raise UsageError(f"--control-image: no such file {path}")
    return to_pil(path, what=f"--control-image {path}")


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
@image_options()
@vae_tile_option()
@scheduler_option()
@cache_options()
@click.option("--control-image", type=click.Path(path_type=Path), metavar="IMAGE.png",
              help="ControlNet conditioning image (edges, depth, ...), resized to the output size; needs artifacts exported with --controlnet.")
@click.option("--controlnet-scale", type=float, help="ControlNet conditioning scale (diffusers' controlnet_conditioning_scale) [default: 1.0].")
@click.option("--control-guidance-start", type=float, help="Fraction of the steps after which the ControlNet starts acting [default: 0.0].")
@click.option("--control-guidance-end", type=float, help="Fraction of the steps after which the ControlNet stops acting [default: 1.0].")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("koala.png"), show_default=True,
              help="PNG to write; several images get numbered names (koala-0.png, koala-1.png, ...).")
@threads_option()
@cpu_precision_option()
@click.option("--verify", is_flag=True, help="Hash every artifact file (and openvino's compiled models) even where the record of "
              "verified files vouches for it (unchanged size, mtime and ctime since it was hashed).")
@click.option("--no-verify", is_flag=True, help="Check artifact file sizes only, not their sha256 (faster start for big models).")
@progress_option(expose=True)
@json_option("the result (paths, settings, timings)")
def generate_cmd(artifacts: Path | None, backend: str, engines: Path | None, model: str | None, prompt: str,
                 negative_prompt: str, steps: int | None, guidance: float | None, seed: int | None, height: int | None,
                 width: int | None, batch: int | None, latents: Path | None, image: Path | None, strength: float | None,
                 mask: Path | None, vae_tile: int | None, scheduler: str | None, cache_interval: int,
                 cache_branch: int | None, control_image: Path | None,
                 controlnet_scale: float | None, control_guidance_start: float | None, control_guidance_end: float | None,
                 out: Path, threads: int | None,
                 cpu_precision: str | None,
                 verify: bool, no_verify: bool, no_progress: bool, as_json: bool) -> None:
    """Generate images with the numpy sampler (tokenize, encode, the scheduler's loop with CFG, VAE decode, PNG).

    onnxruntime and tensorrt never import torch or diffusers. Everything is validated before any
    network runs; a failure leaves no PNG behind."""
    import secrets

    from exporter.cache_branch import check_interval
    from sampler.api import Pipeline
    from sampler.controlnet import CONTROLNET_COMPONENTS
    from sampler.loop import SAMPLER_COMPONENTS, output_paths, save_pngs
    from sampler.pipeline import open_pipeline

    started = time.perf_counter()
    # ----- everything is checked before a network runs -------------------------------------------
    check_out_file(out, example="image.png")
    check_vae_tile(vae_tile)
    check_scheduler(scheduler)
    check_interval(cache_interval)
    if verify and no_verify:
        raise UsageError("--verify and --no-verify contradict each other; pass one")
    if seed is not None and latents is not None:
        raise UsageError("--seed and --latents both set the initial noise; pass one of them")
    lat = _load_latents(latents) if latents is not None else None
    image_args = image_args_of(image, mask, strength)
    control = _read_control_image(control_image, controlnet_scale, control_guidance_start, control_guidance_end)
    check_backend_sources(backend, artifacts, model, engines)
    components: tuple[str, ...] = SAMPLER_COMPONENTS + (CONTROLNET_COMPONENTS if control is not None else ())
    manifest = None
    if artifacts is not None and backend != "torch":  # the ControlNet pair's and the encoder's presence, before any file is hashed
        from exporter.manifest import load_manifest
        from sampler.controlnet import UNET_CONTROLNET, require_controlnet
        from sampler.img2img import no_encoder

        manifest = load_manifest(artifacts)
        held = manifest.components
        if control is not None:
            require_controlnet(held, str(artifacts))
            components = tuple(c for c in components if c != "unet")  # the plain U-Net is not needed then
        elif "unet" not in held and UNET_CONTROLNET in held:
            raise UsageError(f"{artifacts} holds the ControlNet U-Net only (no unet): pass --control-image")
        if image_args and "vae_encoder" not in held and (backend != "tensorrt" or engines is None):
            raise no_encoder(f"{artifacts} ({manifest.view.source.model})")
        if "vae_encoder" in held:  # the encoder's files are verified with the others
            components += ("vae_encoder",)
    opened = open_pipeline(backend, artifacts=artifacts, engines=engines, model=model, threads=threads, cpu_precision=cpu_precision,
                           full_hash=not no_verify, log=log, manifest=manifest, cache=cache_interval > 1, verify=verify,
                           components=components)
    manifest, runtime, verify_s = opened.manifest, opened.backend, opened.verify_seconds
    pipe = Pipeline.from_opened(opened, warn=lambda m: log(f"warning: {m}"))  # the Python API's one path to an image
    sampler = pipe.sampler
    try:
        if backend == "torch" and manifest is not None:
            _warn_if_other_model(runtime, manifest)
        if seed is None and lat is None:
            seed = secrets.randbelow(2**31)
        [plan] = pipe.plan(pipe.requests(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                                         seed=seed if seed is not None else 0, height=height, width=width,
                                         num_images_per_prompt=batch, latents=lat, vae_tile=vae_tile, scheduler=scheduler,
                                         cache_interval=cache_interval, cache_branch=cache_branch, control_image=control,
                                         controlnet_conditioning_scale=controlnet_scale, control_guidance_start=control_guidance_start,
                                         control_guidance_end=control_guidance_end, **image_args))
        paths = output_paths(out, plan.batch)
        log(f"{backend}: {plan.batch} image(s) {plan.width}x{plan.height}, {plan.steps} steps, guidance {plan.guidance:g}"
            + ("" if plan.cfg else " (no CFG)") + (f", seed {plan.seed}" if plan.seed is not None else f", latents {latents}")
            + (f", {'inpainting' if mask else 'img2img'} from {image} at strength {plan.image_inputs.strength:g}" if image else "")
            + f", scheduler {scheduler or 'euler'} ({sampler.scheduler.timestep_spacing} spacing)"
            + (f", VAE decode in {sampler.tile_grid(plan).describe()}" if plan.vae_tile else "")
            + (f", feature cache every {plan.cache_interval} steps at branch {plan.cache_branch}" if plan.cache_interval > 1 else "")
            + (f", ControlNet {control_image} at scale {plan.control.scale:g} (steps {plan.control.start:g}..{plan.control.end:g})"
               if plan.control is not None else ""))
        # ----- load, then run ---------------------------------------------------------------------
        load_ms = 1e3 * pipe.load([plan])
        backend_desc = runtime.describe()
        result = pipe.run([plan], output_type="np", progress=not no_progress)
        images, timings = result.images, result.timings
        t0 = time.perf_counter()
        meta = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": str(plan.steps), "guidance": f"{plan.guidance:g}",
                "seed": str(plan.seed) if plan.seed is not None else f"latents:{latents}", "backend": backend_desc,
                "software": "koala-trt generate",
                **({"image": str(image), "strength": f"{plan.image_inputs.strength:g}"} if image else {}), **({"mask": str(mask)} if mask else {}),
                **({"control_image": str(control_image), "controlnet_conditioning_scale": f"{plan.control.scale:g}",
                    "control_guidance": f"{plan.control.start:g}..{plan.control.end:g}"} if plan.control is not None else {})}
        save_pngs(images, paths, meta)
        png_ms = 1e3 * (time.perf_counter() - t0)
    finally:
        pipe.close()
    summary = timings.summary()
    if as_json:
        print_json({"images": [str(p) for p in paths], "backend": backend_desc, "prompt": prompt, "negative_prompt": negative_prompt,
                    "seed": plan.seed, "latents": str(latents) if latents else None, "steps": plan.steps, "guidance": plan.guidance,
                    "image": str(image) if image else None, "mask": str(mask) if mask else None,
                    "strength": plan.image_inputs.strength if plan.image_inputs is not None else None,
                    "height": plan.height, "width": plan.width, "batch": plan.batch, "vae_tile": plan.vae_tile,
                    "cache": cache_record(plan, timings),
                    "control_image": str(control_image) if control_image else None,
                    "scheduler": {"name": scheduler or "euler", "timestep_spacing": sampler.scheduler.timestep_spacing, "timesteps": [float(t) for t in sampler.scheduler.timesteps]},  # type: ignore[union-attr]
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
