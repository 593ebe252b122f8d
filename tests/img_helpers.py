"""Shared by the img2img and inpainting tests: test images, an artifacts folder with the VAE encoder,
our sampler's image and diffusers' from the same components, noise and inputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 128  # px: 16x16 latents, inside the export ranges of random:tiny (128..512) and the tiny-inpaint fixture (64..256)


def picture(size: int = SIZE, seed: int = 0) -> Any:
    """A smooth RGB picture with some texture (a PIL image)."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(seed)
    rgb = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 0.4 + 0.5
    rgb = rgb + rng.normal(0, 0.05, rgb.shape)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))


def square_mask(size: int = SIZE) -> Any:
    """White (repaint) in a centred square, black elsewhere, with a soft edge that binarizing decides."""
    from PIL import Image

    m = np.zeros((size, size), np.uint8)
    q = size // 4
    m[q:3 * q, q:3 * q] = 255
    m[q - 1, q:3 * q] = 120  # below 0.5: kept
    m[3 * q, q:3 * q] = 140  # above 0.5: repainted
    return Image.fromarray(m)


def add_components(base: Path, extra: Path, out: Path) -> Path:
    """A copy of artifacts folder `base` (hard links) with the components of `extra` (an export of the
    same model with other --components) added to its files and manifest."""
    shutil.copytree(base, out, copy_function=os.link)
    m = json.loads((base / "manifest.json").read_text())
    e = json.loads((extra / "manifest.json").read_text())
    assert m["source"] == e["source"], "the two exports must come from the same model"
    for name, rec in e["components"].items():
        shutil.copytree(extra / name, out / name, copy_function=os.link)
        m["components"][name] = rec
    m["files"].update({k: v for k, v in e["files"].items() if k.split("/")[0] in e["components"]})
    (out / "manifest.json").unlink()
    (out / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
    return out


def ours(artifacts: Path, backend: str, noise: np.ndarray, **request: Any) -> np.ndarray:
    """Our sampler's images ([batch, H, W, 3] in [0, 1]) from `noise` (given as --latents)."""
    from sampler.loop import Request, Sampler
    from sampler.pipeline import open_pipeline

    # openvino in FP32: "auto" runs BF16 on a CPU with AVX512-BF16 or AMX (about 46-48 dB here)
    with open_pipeline(backend, artifacts=artifacts, cpu_precision="fp32" if backend == "openvino" else None) as pipe:
        sampler = Sampler(pipe.backend, pipe.assets)
        plan = sampler.plan(Request(latents=noise, **request))
        images, _ = sampler.sample(plan, progress=False)
    return images


def diffusers_image(pipe: Any, noise: np.ndarray, **kwargs: Any) -> np.ndarray:
    """diffusers' pipeline with the noise it draws replaced by `noise` and the VAE posterior's sample by
    its mean (retrieve_latents(..., sample_mode="argmax")), as koala-trt does (validation.reference.image_noise)."""
    import torch

    from validation.reference import image_noise

    with torch.no_grad(), image_noise(pipe, noise):
        return pipe(output_type="np", **kwargs).images
