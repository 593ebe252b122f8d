"""`validate` with a ControlNet: the numpy sampler with a control image against diffusers'
StableDiffusionXLControlNetPipeline over the reference's own modules, from the same noise and the
same control image (a synthetic edge pattern at the validation size), per prompt.

The reference pipeline's final latents (output_type="latent") are decoded as the pipeline decodes
them (scaling factor, latents mean/std where the VAE has them, clamp to [0, 1]), so one run gives
both the latents and the image the end-to-end metrics compare.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

SCALE = 0.8  # the conditioning scale the check runs at (diffusers' examples use 0.5-1.0)


def control_pattern(height: int, width: int) -> np.ndarray:
    """A deterministic edge-like uint8 [H, W, 3] image: horizontal and vertical lines and a filled box."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:: max(2, height // 16)] = 255
    a[:, :: max(2, width // 20), 1] = 200
    a[height // 3:2 * height // 3, width // 4:3 * width // 4, 2] = 160
    return a


def reference_runs(pipe: Any, controlnet: Any, prompts: list[str], noise: list[np.ndarray], steps: int, guidance: float,
                   height: int, width: int, image: np.ndarray, scale: float = SCALE) -> Any:
    """validation.reference.Trajectories (latents and images only) of the diffusers ControlNet pipeline."""
    import torch
    from diffusers import StableDiffusionXLControlNetPipeline
    from PIL import Image

    from validation.reference import Trajectories

    parts = {k: getattr(pipe, k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")}
    cpipe = StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet, add_watermarker=False)
    cpipe.set_progress_bar_config(disable=True)
    vae = cpipe.vae
    traj = Trajectories(prompts=list(prompts), noise=list(noise))
    for prompt, lat in zip(prompts, noise):
        with torch.no_grad():
            out = cpipe(prompt, image=Image.fromarray(image), num_inference_steps=steps, guidance_scale=guidance, height=height,
                        width=width, latents=torch.from_numpy(lat.copy()), controlnet_conditioning_scale=scale,
                        output_type="latent").images
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                m = torch.tensor(mean).view(1, -1, 1, 1)
                s = torch.tensor(std).view(1, -1, 1, 1)
                decoded = vae.decode(out * s / vae.config.scaling_factor + m, return_dict=False)[0]
            else:
                decoded = vae.decode(out / vae.config.scaling_factor, return_dict=False)[0]
        traj.latents.append(out.float().numpy())
        traj.images.append((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy())
    return traj


def candidate_runs(sampler: Any, ref: Any, steps: int, guidance: float, height: int, width: int, image: np.ndarray,
                   log: Callable[[str], None], scale: float = SCALE) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """The sampler's final latents and images ([1, H, W, 3] in [0, 1]) with the control image, per prompt."""
    from sampler.loop import Request

    latents, images = [], []
    t0 = time.perf_counter()
    for prompt, noise in zip(ref.prompts, ref.noise):
        plan = sampler.plan(Request(prompt, steps=steps, guidance=guidance, height=height, width=width, latents=noise,
                                    control_image=image, controlnet_conditioning_scale=scale))
        lat, _ = sampler.sample(plan, progress=False, warn=lambda m: log(f"warning: {m}"), decode=False)
        decoded = sampler.decode(sampler.unscale_latents(lat)).astype(np.float32)
        latents.append(lat.astype(np.float32))
        images.append(np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
    return latents, images, time.perf_counter() - t0
