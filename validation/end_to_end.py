"""End to end: koala-trt's numpy Sampler on the backend against diffusers' PyTorch pipeline, with the
same prompts, the same initial latents, steps, guidance and size. Measured: relative L2 of the final
latents (after the last scheduler step, before the VAE), and PSNR and SSIM of the decoded images."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from exporter.metrics import error_stats
from exporter.tolerances import passes
from validation.images import psnr, ssim
from validation.reference import Trajectories
from validation.results import Check, Measured


def candidate_run(sampler: Any, ref: Trajectories, steps: int, guidance: float, height: int, width: int,
                  log: Callable[[str], None], vae_tile: int | None = None,
                  scheduler: str | None = None, image_inputs: dict[str, Any] | None = None, cache_interval: int = 1,
                  cache_branch: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """The sampler's final latents and images ([1, H, W, 3] in [0, 1]) per prompt, and the seconds taken.
    The images are decoded as the sampler decodes them: in tiles with `vae_tile` (or a VAE engine
    built for a tile), so the comparison with diffusers' untiled decode includes the tiling's error.
    Prompt i's step noise (euler_a, lcm) has seed i, as reference.run_trajectories feeds diffusers.
    `image_inputs`: img2img / inpainting (image, mask_image, strength), the noise added to the image's latents."""
    from sampler.loop import Request

    latents, images = [], []
    t0 = time.perf_counter()
    for i, (prompt, noise) in enumerate(zip(ref.prompts, ref.noise)):
        plan = sampler.plan(Request(prompt, steps=steps, guidance=guidance, height=height, width=width, latents=noise,
                                    vae_tile=vae_tile, scheduler=scheduler, seed=i, cache_interval=cache_interval,
                                    cache_branch=cache_branch, **(image_inputs or {})))
        lat, _ = sampler.sample(plan, progress=False, warn=lambda m: log(f"warning: {m}"), decode=False)
        # Decoded as Sampler.sample does (its decode step), so latents and images come from one run.
        image = sampler.decode(sampler.unscale_latents(lat), tile=plan.vae_tile).astype(np.float32)
        latents.append(lat.astype(np.float32))
        images.append(np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
    return latents, images, time.perf_counter() - t0


def measure(check: Check, ref: Trajectories, latents: list[np.ndarray], images: list[np.ndarray]) -> Check:
    """Worst case over the prompts of each end-to-end metric, against check.limits."""
    lim = check.limits
    lat = [error_stats(r, c) for r, c in zip(ref.latents, latents)]
    # NaN images would read as black after the clip; count them before.
    nonfinite = sum(s.nonfinite for s in lat) + sum(int(np.size(i) - np.count_nonzero(np.isfinite(i))) for i in images)
    p = [psnr(r, c) for r, c in zip(ref.images, images)]
    s = [ssim(r, c) for r, c in zip(ref.images, images)]
    rel = float("nan") if any(x.nonfinite for x in lat) else max(x.rel_l2 for x in lat)
    worst_p = float("nan") if any(np.isnan(p)) else min(p)
    worst_s = float("nan") if any(np.isnan(s)) else min(s)
    check.samples = len(latents)
    check.shapes = {"latents": list(latents[0].shape), "images": list(images[0].shape)}
    check.outputs = {"latents": {"rel_l2": [x.rel_l2 for x in lat], "cosine": [x.cosine for x in lat], "max_abs": [x.max_abs for x in lat]},
                     "images": {"psnr": p, "ssim": s}}
    check.outputs = _json_safe(check.outputs)
    check.measured = [
        Measured("latents", "latent_rel_l2", rel, lim["latent_rel_l2"], passes("latent_rel_l2", rel, lim["latent_rel_l2"])),
        Measured("images", "psnr", worst_p, lim["psnr"], passes("psnr", worst_p, lim["psnr"]),
                 "identical images" if worst_p == float("inf") else ""),
        Measured("images", "ssim", worst_s, lim["ssim"], passes("ssim", worst_s, lim["ssim"])),
        Measured("latents+images", "nonfinite", float(nonfinite), 0.0, nonfinite == 0),
    ]
    return check


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v
