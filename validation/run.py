"""`koala-trt validate` as a function: open the artifacts and the backend, run the PyTorch reference,
check each component on random and on prompt-derived inputs, then end to end; returns the report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from exporter.tolerances import END_TO_END, Override, check_precision, end_to_end_precision, limits_for
from koala_core.errors import UsageError
from validation.results import Check, Measured

Log = Callable[[str], None]


@dataclass
class ValidateOptions:
    artifacts: Path
    backend: str = "onnxruntime"
    model: str | None = None  # default: the model the artifacts were exported from
    engines: Path | None = None
    components: list[str] | None = None  # default: every component of the artifacts
    height: int | None = None  # default: the manifest's sampler size
    width: int | None = None
    steps: int = 4
    prompts: list[str] = field(default_factory=list)
    seed: int = 0
    random_samples: int = 2
    random_sets: bool = True  # the random input sets (convert/quantize's accuracy.json runs the prompt sets only)
    trajectory_samples: int = 2  # U-Net calls taken from the reference trajectories (first and last step)
    overrides: list[Override] = field(default_factory=list)
    end_to_end: bool = True
    verify: bool = True
    threads: int | None = None
    cpu_precision: str | None = None  # --backend openvino: auto, fp32 or bf16
    vae_tile: int | None = None  # end to end: decode in tiles of this many pixels (the sampler's --vae-tile)
    scheduler: str | None = None  # a sampler.schedulers name for the trajectories and end to end; None: the model's own
    image_inputs: dict[str, Any] | None = None  # img2img / inpainting (image, mask_image, strength): trajectories and end to end
    cache_interval: int = 1  # end to end with feature caching, against DeepCache on the pipeline (1: off)
    cache_branch: int | None = None
    verbose: bool = False


def settings(opts: ValidateOptions, height: int, width: int) -> dict[str, Any]:
    return {"height": height, "width": width, "steps": opts.steps, "prompts": list(opts.prompts), "seed": opts.seed,
            "random_samples": opts.random_samples, "vae_tile": opts.vae_tile, "scheduler": opts.scheduler,
            "image": _image_digest(opts.image_inputs),
            **({"cache_interval": opts.cache_interval, "cache_branch": opts.cache_branch} if opts.cache_interval > 1 else {})}


def _image_digest(given: dict[str, Any] | None) -> dict[str, Any] | None:
    """img2img / inpainting settings as a baseline compares them: the pixels' sha256, the strength."""
    if not given or given.get("image") is None:
        return None
    import hashlib

    def sha(img: Any) -> str | None:
        return None if img is None else hashlib.sha256(img.convert("RGB").tobytes() + repr(img.size).encode()).hexdigest()

    return {"image_sha256": sha(given["image"]), "mask_sha256": sha(given.get("mask_image")), "strength": given.get("strength")}


def default_size(artifacts: Path, height: int | None, width: int | None) -> tuple[int, int]:
    """--height/--width, defaulting to the manifest's sampler size (the model's native size)."""
    from exporter.manifest import load_manifest

    sampler = load_manifest(artifacts).view.sampler
    return (int(sampler.get("height", 1024)) if height is None else height,
            int(sampler.get("width", 1024)) if width is None else width)


def _check_model(source: Any, manifest: Any) -> None:
    recorded = manifest.view.source.config_sha256
    mine = source.config_sha256()
    differ = [k for k in ("text_encoder", "text_encoder_2", "unet", "vae") if k in recorded and recorded[k] != mine.get(k)]
    if differ:
        raise UsageError(f"--model {source.ref} is not the model the artifacts were exported from "
                         f"({manifest.view.source.model}): configs differ in {', '.join(differ)}")


def validate(opts: ValidateOptions, log: Log) -> dict[str, Any]:
    from calibration.inputs import spread
    from exporter.manifest import load_manifest
    from exporter.sources import resolve_recorded
    from runtime.backend import OnnxRuntimeBackend
    from sampler.loop import SAMPLER_COMPONENTS, Sampler, initial_noise
    from sampler.pipeline import open_pipeline
    from validation.compare import compare
    from validation.end_to_end import candidate_run, measure
    from validation.inputs import batch_for, random_inputs, token_inputs
    from validation.reference import PipelineBackend, load_pipeline, run_trajectories
    from validation.runners import backend_runner, interface_problems, runner_for

    started = time.perf_counter()
    if opts.backend == "tensorrt" and opts.engines is not None:
        from engines.engine_manifest import choose_library

        choose_library(opts.engines)  # before the comparison imports Polygraphy
    # ----- everything that can be wrong with the request fails before a network runs ---------------
    if opts.steps < 1:
        raise UsageError(f"--steps must be at least 1 (got {opts.steps})")
    from sampler.schedulers import check_name

    check_name(opts.scheduler)
    if opts.random_samples < 1:
        raise UsageError(f"--random-samples must be at least 1 (got {opts.random_samples})")
    if not opts.prompts:
        raise UsageError("no prompts to validate on")
    manifest = load_manifest(opts.artifacts)
    comps = list(opts.components or [c for c in manifest.components])
    unknown = [c for c in comps if c not in manifest.components]
    if unknown:
        raise UsageError(f"{opts.artifacts} has no {', '.join(unknown)} (it holds {', '.join(manifest.components)})")
    precisions = {c: check_precision(manifest.precision(c), f"{opts.artifacts}/manifest.json ({c})") for c in comps}
    height, width = default_size(opts.artifacts, opts.height, opts.width)
    run_e2e = opts.end_to_end and all(c in comps or (c == "unet" and "unet_deep" in comps) for c in SAMPLER_COMPONENTS)
    # With a ControlNet: the sampler with a control image against diffusers' ControlNet pipeline (validation/controlnet.py).
    run_cn = opts.end_to_end and all(c in comps for c in ("text_encoder", "text_encoder_2", "vae_decoder", "controlnet", "unet_controlnet"))
    source = resolve_recorded(opts.model or manifest.view.source.model, manifest.view.source.controlnet)
    _check_model(source, manifest)
    pipeline = open_pipeline(opts.backend, artifacts=opts.artifacts, engines=opts.engines, manifest=manifest, components=comps,
                             threads=opts.threads, cpu_precision=opts.cpu_precision, full_hash=opts.verify, log=log)
    backend, assets = pipeline.backend, pipeline.assets
    specs = {c: (backend.specs.get(c) or manifest.spec(c)) for c in comps}
    ranges = {c: backend.shape_range(c) for c in comps}
    precisions = {c: backend.run_precision(c, p) for c, p in precisions.items()}  # openvino's BF16 gets BF16 limits
    try:
        image_inputs = _image_inputs(opts.image_inputs, height, width)
        pipeline.check_size(comps, height, width)
        if "unet" in comps:  # every prompt within the U-Net's sequence range, before the reference runs
            from sampler.loop import check_prompt_range
            from sampler.tokenize import ClipTokenizer, prompt_tokens

            toks = [ClipTokenizer(manifest.root / t) for t in manifest.view.tokenizers]
            check_prompt_range(specs["unet"], ranges["unet"], prompt_tokens(toks, opts.prompts))
        sampler = Sampler(backend, assets) if run_e2e or run_cn else None
        if sampler is not None and run_e2e:  # the end-to-end request as the sampler will plan it (a --vae-tile the VAE cannot take)
            from sampler.loop import Request

            plan = sampler.plan(Request(opts.prompts[0], steps=opts.steps, guidance=source.sampler.guidance,
                                        height=height, width=width, vae_tile=opts.vae_tile, scheduler=opts.scheduler,
                                        cache_interval=opts.cache_interval, cache_branch=opts.cache_branch, **image_inputs))
            opts.cache_branch = plan.cache_branch  # the artifacts' split, where not given
        elif "unet" in comps and image_inputs.get("mask_image") is None and specs["unet"].input("sample").dims[1] != 4:
            raise UsageError(f"the U-Net takes {specs['unet'].input('sample').dims[1]} input channels (an inpainting U-Net): "
                             "its reference trajectories need --image and --mask")
    except BaseException:
        backend.close()
        raise

    checks: list[Check] = []
    shown: list[Any] = []  # the end-to-end images per prompt, for --html (validation/html_report.py)
    try:
        # ----- the PyTorch reference -------------------------------------------------------------
        t0 = time.perf_counter()
        pipe = load_pipeline(source, "text2img" if not image_inputs else "inpaint" if image_inputs.get("mask_image") is not None else "img2img")
        controlnet = source.build("controlnet") if "controlnet" in source.configs else None
        if controlnet is not None:
            pipe.controlnet = controlnet  # the reference of the controlnet component (PipelineBackend reads pipe.<module>)
        reference = PipelineBackend(pipe, manifest.specs())
        log(f"reference: PyTorch pipeline of {source.ref} built in {time.perf_counter() - t0:.1f} s")
        # The full U-Net: unet, else feature caching's unet_deep, else the ControlNet U-Net (a folder may hold only that).
        unet_name = next(u for u in ("unet", "unet_deep", "unet_controlnet") if u in manifest.components) \
            if any(u in manifest.components for u in ("unet", "unet_deep", "unet_controlnet")) else "unet"
        unet_spec = manifest.spec(unet_name) if unet_name in manifest.components else None
        traj = None
        if any(c in comps for c in ("unet", "vae_decoder")) or run_e2e or run_cn:
            if unet_spec is None:
                raise UsageError(f"{opts.artifacts} has no unet: the prompt inputs of the U-Net and VAE come from its trajectories")
            f = unet_spec.latent_factor
            shape = (int(unet_spec.outputs[0].dims[1]), height // f, width // f)  # the latents' channels (an inpainting U-Net takes 9)
            noise = [initial_noise(opts.seed + i, 1, shape) for i in range(len(opts.prompts))]
            t0 = time.perf_counter()
            cache = (opts.cache_interval, int(opts.cache_branch)) if opts.cache_interval > 1 and opts.cache_branch is not None else None
            traj = run_trajectories(pipe, opts.prompts, noise, opts.steps, source.sampler.guidance, height, width, opts.scheduler,
                                    image_inputs, cache)
            log(f"reference: {len(opts.prompts)} prompts x {opts.steps} steps at {width}x{height} in "
                f"{time.perf_counter() - t0:.1f} s")

        # ----- per component ---------------------------------------------------------------------
        for c in comps:
            spec = specs[c]
            limits = limits_for(c, precisions[c], opts.overrides)
            problems = interface_problems(backend, c, spec)
            if problems:
                chk = Check(c, "interface", precisions[c], "graph inputs/outputs against the spec", limits=limits)
                chk.measured = [Measured(p.split(":")[0], "interface", None, 0.0, False, p) for p in problems]
                checks.append(chk)
                log(f"{c}: FAIL interface ({'; '.join(problems)})")
                continue
            ref_runner = backend_runner(reference, c, spec, "pytorch")
            cand_runner = runner_for(backend, c, spec, opts.backend)
            sets = [random_inputs(spec, batch_for(c, ranges[c]), height, width, opts.random_samples, opts.seed + 1000)] if opts.random_sets else []
            if spec.kind == "text_encoder":
                tok_dir = manifest.root / manifest.view.tokenizers[0 if c == "text_encoder" else 1]
                sets.append(token_inputs(tok_dir, spec, opts.prompts))
            elif c == "unet" and traj is not None:
                calls = spread(traj.unet_calls, opts.trajectory_samples)
                sets.append(_input_set("prompts", f"U-Net inputs of {len(calls)} steps of the reference trajectories "
                                       f"(CFG batch, {len(opts.prompts)} prompts)", calls))
            elif c == "vae_decoder" and traj is not None:
                unscale = Sampler(backend, assets).unscale_latents  # the VAE's latent space, as the sampler decodes
                sets.append(_input_set("prompts", "final latents of the reference trajectories",
                                       [{"latent_sample": unscale(lat)} for lat in traj.latents]))
            for s in sets:
                feeds = [{k: v.astype(_np_dtype(spec, k), copy=False) for k, v in fd.items()} for fd in s.feeds]
                chk = Check(c, s.kind, precisions[c], s.description, limits=limits)
                t0 = time.perf_counter()
                compare(chk, ref_runner, cand_runner, feeds, opts.verbose)
                checks.append(chk)
                worst = max((m for m in chk.measured if m.metric == "rel_l2"), key=lambda m: m.value or 0, default=None)
                log(f"{chk.id}: {'ok' if chk.passed else 'FAIL'} ({chk.samples} samples, "
                    f"rel L2 {worst.value if worst else float('nan'):.2e}, {time.perf_counter() - t0:.1f} s)")
            if isinstance(backend, OnnxRuntimeBackend):
                # One graph in memory at a time beside the PyTorch reference (full-size models at
                # 1024 px); the end-to-end run opens the sessions again.
                backend.close()
            later = comps[comps.index(c) + 1:]
            if all(specs[o].module != spec.module for o in later) and not run_cn:  # the ControlNet run needs every module
                reference.release(c)  # the trajectories already hold what end to end compares with

        # ----- end to end ------------------------------------------------------------------------
        if sampler is not None and traj is not None:
            e2e_prec = end_to_end_precision(precisions.values())
            chk = Check(END_TO_END, END_TO_END, e2e_prec, f"numpy Sampler on {opts.backend} vs the diffusers pipeline, "
                        f"{len(opts.prompts)} prompts, {opts.steps} steps, guidance {source.sampler.guidance:g}"
                        + (f", VAE decoded in {opts.vae_tile} px tiles" if opts.vae_tile else ""),
                        limits=limits_for(END_TO_END, e2e_prec, opts.overrides))
            latents, images, secs = candidate_run(sampler, traj, opts.steps, source.sampler.guidance, height, width, log,
                                                 vae_tile=opts.vae_tile, scheduler=opts.scheduler, image_inputs=image_inputs,
                                                 cache_interval=opts.cache_interval, cache_branch=opts.cache_branch)
            measure(chk, traj, latents, images)
            shown = prompt_images(traj, images, chk)
            chk.seconds = {opts.backend: round(secs, 3)}
            checks.append(chk)
            log(f"end_to_end: {'ok' if chk.passed else 'FAIL'} ({secs:.1f} s)")
        elif opts.end_to_end and not run_cn:
            log("end_to_end: skipped (it needs all of " + ", ".join(SAMPLER_COMPONENTS) + ")")
        if sampler is not None and traj is not None and run_cn:
            from validation.controlnet import SCALE, candidate_runs, control_pattern, reference_runs

            cn_prec = end_to_end_precision([precisions[c] for c in comps if c != "unet"])
            image = control_pattern(height, width)
            chk = Check(END_TO_END, "controlnet", cn_prec, f"numpy Sampler on {opts.backend} with a control image (synthetic edges, "
                        f"scale {SCALE:g}) vs diffusers' StableDiffusionXLControlNetPipeline, {len(opts.prompts)} prompts, "
                        f"{opts.steps} steps, guidance {source.sampler.guidance:g}", limits=limits_for(END_TO_END, cn_prec, opts.overrides))
            t0 = time.perf_counter()
            cn_ref = reference_runs(pipe, controlnet, opts.prompts, traj.noise, opts.steps, source.sampler.guidance, height, width, image)
            log(f"reference: ControlNet pipeline, {len(opts.prompts)} prompts in {time.perf_counter() - t0:.1f} s")
            latents, images, secs = candidate_runs(sampler, cn_ref, opts.steps, source.sampler.guidance, height, width, image, log)
            measure(chk, cn_ref, latents, images)
            chk.seconds = {opts.backend: round(secs, 3)}
            checks.append(chk)
            log(f"{chk.id}: {'ok' if chk.passed else 'FAIL'} ({secs:.1f} s)")
        backend_desc = backend.describe()
    finally:
        backend.close()

    return {
        "tool": "koala-trt validate", "artifacts": str(opts.artifacts), "model": source.ref, "backend": opts.backend,
        "backend_description": backend_desc, "reference": f"PyTorch FP32 diffusers pipeline ({source.ref})",
        **settings(opts, height, width), "guidance": source.sampler.guidance,
        "components": {c: precisions[c] for c in comps}, "end_to_end": run_e2e,
        "checks": [c.to_json() for c in checks], "_checks": checks, "_images": shown,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _image_inputs(given: dict[str, Any] | None, height: int, width: int) -> dict[str, Any]:
    """--image/--mask opened and resized to the run's size (Lanczos, as both pipelines would), so the
    reference and the sampler start from the same pixels; {} without an image."""
    if not given or given.get("image") is None:
        return {}
    from PIL import Image

    from sampler.img2img import check_strength, open_image, to_rgb

    def sized(img: Any) -> Any:
        return img if img.size == (width, height) else img.resize((width, height), resample=Image.Resampling.LANCZOS)

    image = to_rgb(open_image(given["image"], "--image"))
    mask = given.get("mask_image")
    if mask is not None:
        mask = open_image(mask, "--mask")
        if mask.size != image.size:
            raise UsageError(f"--mask is {mask.width}x{mask.height} px but --image is {image.width}x{image.height} px; give a mask of the image's size")
        mask = sized(mask.convert("L"))
    strength = given.get("strength")
    return {"image": sized(image), "mask_image": mask,
            "strength": check_strength(strength) if strength is not None else (0.9999 if mask is not None else 0.3)}


def finish(report: dict[str, Any]) -> dict[str, Any]:
    """Verdicts and failure lines from the checks (after a baseline was applied); JSON-ready."""
    checks: list[Check] = report.pop("_checks")
    report.pop("_images", None)
    report["checks"] = [c.to_json() for c in checks]
    # Non-finite values first: they explain every other broken metric of that output.
    bad = sorted(((c, m) for c in checks for m in c.failures()), key=lambda cm: cm[1].metric != "nonfinite")
    report["failures"] = [f"{c.id}: {c.component}.{m.describe()}" for c, m in bad]
    report["passed"] = bool(checks) and not report["failures"]
    return report


def prompt_images(traj: Any, images: list[np.ndarray], check: Check) -> list[Any]:
    """Reference and candidate image of each end-to-end prompt with its PSNR and SSIM (--html)."""
    from validation.html_report import PromptImages

    p, s = check.outputs["images"]["psnr"], check.outputs["images"]["ssim"]
    return [PromptImages(prompt, ref[0], cand[0], _finite_or(p[i], ref, cand), s[i])
            for i, (prompt, ref, cand) in enumerate(zip(traj.prompts, traj.images, images))]


def _finite_or(psnr: float | None, ref: np.ndarray, cand: np.ndarray) -> float | None:
    """The JSON-safe PSNR is None both for identical images (inf) and for non-finite ones: tell them apart."""
    if psnr is None and np.isfinite(cand).all() and np.array_equal(ref, cand):
        return float("inf")
    return psnr


def _input_set(kind: str, description: str, feeds: list[dict[str, np.ndarray]]) -> Any:
    from validation.inputs import InputSet

    return InputSet(kind, description, feeds)


def _np_dtype(spec: Any, name: str) -> Any:
    from exporter.specs import NUMPY_DTYPES

    return NUMPY_DTYPES[spec.input(name).dtype]

