"""img2img and inpainting in numpy: what diffusers' StableDiffusionXLImg2ImgPipeline and
StableDiffusionXLInpaintPipeline add to text-to-image, over any backend.

- The image (PIL, a PNG file or bytes, uint8 [H, W, 3]) is converted to RGB and resized with Lanczos
  to the run's size (default: its own size rounded down to a multiple of the VAE factor), scaled to
  [-1, 1] (diffusers' VaeImageProcessor). The mask (white = repaint) is converted to grayscale,
  resized the same way, scaled to [0, 1] and binarized at 0.5 (its mask processor).
- The VAE encoder gives the posterior's mean and log-variance; the image's latents are the mean
  (diffusers' `retrieve_latents(..., sample_mode="argmax")`, no sampling), times the scaling factor
  (img2img: (mean - latents_mean) * scaling_factor / latents_std where the VAE config has them; the
  inpainting pipeline applies the scaling factor only, as diffusers' `_encode_vae_image` does).
- Strength s keeps the last min(int(steps * s), steps) steps: denoising starts at the scheduler's
  begin_index, (steps - int(steps * s)) * order, from the image's latents noised to that index with the very
  noise text-to-image would start from (--seed or --latents).
- Inpainting with a 4-channel U-Net (KOALA, SDXL base): after each step the known region (mask 0)
  is replaced by the image's latents noised to the next step's timestep. With a 9-channel inpainting
  U-Net: the mask (nearest-downsampled to the latents) and the latents of the masked image
  (image * (mask < 0.5)) are concatenated to the U-Net input on the channel axis, and the loop is
  text-to-image's. Strength 1 starts inpainting from pure noise (noise * init_noise_sigma).

No torch, no diffusers: numpy and Pillow.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from koala_core.errors import UsageError

F32 = np.float32
ENCODER = "vae_encoder"
LATENT_CHANNELS = 4  # what the VAE's latent space has (SDXL, KOALA); a 9-channel U-Net takes 4 + 1 + 4


# ----- reading and preprocessing ----------------------------------------------------------------

def open_image(src: Any, what: str = "--image") -> Any:
    """A PIL image from a path, PNG/JPEG bytes, a PIL image or a uint8 array ([H, W, 3], [H, W, 4] or
    [H, W]); UsageError in one line for anything else (not an image, a truncated file)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim not in (2, 3) or (src.ndim == 3 and src.shape[2] not in (1, 3, 4)) or 0 in src.shape:
            raise UsageError(f"{what}: expected uint8 [H, W, 3] (or [H, W]) pixels, got {src.dtype} {list(src.shape)}")
        img = Image.fromarray(src[..., 0] if src.ndim == 3 and src.shape[2] == 1 else src)
    else:
        if isinstance(src, (bytes, bytearray, memoryview)):
            data, name = bytes(src), "the image bytes"
        else:
            path = Path(src)
            if not path.is_file():
                raise UsageError(f"{what}: no such file {path}")
            data, name = path.read_bytes(), str(path)
        try:
            img = Image.open(io.BytesIO(data))
            img.load()  # decodes now: a truncated file fails here, not later
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            why = "not an image" if isinstance(e, UnidentifiedImageError) else f"unreadable ({str(e).splitlines()[0][:100]})"
            raise UsageError(f"{what}: {name} is {why}; expected a PNG or JPEG") from None
    if img.width < 1 or img.height < 1:
        raise UsageError(f"{what}: the image is empty ({img.width}x{img.height})")
    return img


def to_rgb(img: Any) -> Any:
    """RGB as the VAE takes it: grayscale repeated, RGBA's alpha dropped, palettes expanded."""
    return img if img.mode == "RGB" else img.convert("RGB")


def default_size(img: Any, factor: int) -> tuple[int, int]:
    """(height, width) of a run on `img` without --height/--width: its own size rounded down to a
    multiple of the VAE factor (diffusers' get_default_height_width)."""
    return img.height // factor * factor, img.width // factor * factor


def _resized(img: Any, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if (img.width, img.height) != (width, height):
        img = img.resize((width, height), resample=Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=F32) / F32(255.0)


def preprocess_image(img: Any, height: int, width: int) -> np.ndarray:
    """float32 [1, 3, height, width] in [-1, 1] (VaeImageProcessor.preprocess: resize, /255, 2x - 1)."""
    x = _resized(to_rgb(img), height, width).transpose(2, 0, 1)[None]
    return np.ascontiguousarray(F32(2.0) * x - F32(1.0))


def preprocess_mask(mask: Any, height: int, width: int) -> np.ndarray:
    """float32 [1, 1, height, width] in {0, 1}: grayscale, resized, /255, 1 where >= 0.5 (the mask
    processor: do_convert_grayscale, do_binarize, no normalization)."""
    m = _resized(mask if mask.mode == "L" else mask.convert("L"), height, width)
    return np.where(m < 0.5, F32(0.0), F32(1.0))[None, None].astype(F32)


def no_encoder(origin: str) -> UsageError:
    """The one refusal of an image request where `origin` (artifacts, engines) has no VAE encoder."""
    return UsageError(f"{origin} has no vae_encoder, which --image needs: export it (koala-trt export --components ... vae_encoder) "
                      "or build its engine")


def check_strength(strength: float) -> float:
    s = float(strength)
    if not math.isfinite(s) or not 0.0 < s <= 1.0:
        raise UsageError(f"--strength must be in (0, 1] (got {strength})")
    return s


def check_steps_left(steps: int, strength: float) -> None:
    """Strength keeps the last min(int(steps * strength), steps) steps (diffusers' get_timesteps; the
    start index is the scheduler's begin_index): UsageError when none is left."""
    if min(int(steps * strength), steps) < 1:
        raise UsageError(f"--strength {strength:g} x --steps {steps} leaves no denoising step; raise either "
                         f"(at least {math.ceil(1 / strength)} steps for this strength)")


def add_noise(sched: Any, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:
    """`original` noised to the scheduler's step `index` (diffusers' scheduler.add_noise at that step)."""
    return sched.add_noise(original, noise, index).astype(F32, copy=False)


def posterior_mean(parameters: np.ndarray) -> np.ndarray:
    """The mean half of the VAE encoder's [mean, log-variance] output (sample_mode="argmax")."""
    return np.ascontiguousarray(parameters[:, : parameters.shape[1] // 2]).astype(F32, copy=False)


def scale_latents(mean: np.ndarray, scaling_factor: float, latents_mean: tuple[float, ...] | None = None,
                  latents_std: tuple[float, ...] | None = None) -> np.ndarray:
    """VAE latents to the U-Net's scale: (x - mean) * sf / std where the config has them, else x * sf."""
    sf = F32(scaling_factor)
    if latents_mean is not None and latents_std is not None:
        m = np.asarray(latents_mean, F32).reshape(1, -1, 1, 1)
        s = np.asarray(latents_std, F32).reshape(1, -1, 1, 1)
        return ((mean - m) * sf / s).astype(F32)
    return (sf * mean).astype(F32)


# ----- one request's image inputs -----------------------------------------------------------------

@dataclass(frozen=True)
class ImageInputs:
    """A checked img2img / inpainting request: the preprocessed image and mask at the run's size."""

    image: np.ndarray  # float32 [1, 3, H, W] in [-1, 1]
    mask: np.ndarray | None  # float32 [1, 1, H, W] in {0, 1}; None for img2img
    strength: float

    @property
    def inpaint(self) -> bool:
        return self.mask is not None


def prepare(image: Any, mask_image: Any, strength: float | None, height: int | None, width: int | None, factor: int,
            unet_channels: int) -> tuple[ImageInputs | None, int | None, int | None]:
    """Check the request's image inputs before any model run; (inputs or None, height, width), the
    sizes defaulting to the image's own (rounded down to `factor`)."""
    if image is None:
        if mask_image is not None:
            raise UsageError("--mask needs --image (the image to inpaint)")
        if strength is not None:
            raise UsageError("--strength needs --image (img2img or inpainting)")
        if unet_channels != LATENT_CHANNELS:
            raise UsageError(f"this U-Net takes {unet_channels} input channels (an inpainting U-Net): pass --image and --mask")
        return None, height, width
    # diffusers' defaults: 0.3 for img2img, 0.9999 for inpainting
    s = check_strength(strength if strength is not None else (0.9999 if mask_image is not None else 0.3))
    img = open_image(image, "--image")
    mask = open_image(mask_image, "--mask") if mask_image is not None else None
    if mask is None and unet_channels != LATENT_CHANNELS:
        raise UsageError(f"this U-Net takes {unet_channels} input channels (an inpainting U-Net): pass --mask with --image")
    if unet_channels not in (LATENT_CHANNELS, 2 * LATENT_CHANNELS + 1):
        raise UsageError(f"the U-Net takes {unet_channels} input channels; img2img and inpainting need 4 (or 9 for an inpainting U-Net)")
    if mask is not None and mask.size != img.size:
        raise UsageError(f"--mask is {mask.width}x{mask.height} px but --image is {img.width}x{img.height} px; give a mask of the image's size")
    dh, dw = default_size(img, factor)
    h = dh if height is None else height
    w = dw if width is None else width
    if h <= 0 or w <= 0:
        raise UsageError(f"--image is {img.width}x{img.height} px, smaller than the VAE's {factor} px granularity")
    if h % factor or w % factor:
        return None, h, w  # the size check names the rule
    return ImageInputs(preprocess_image(img, h, w), preprocess_mask(mask, h, w) if mask is not None else None, s), h, w


class ImageConditioning:
    """The per-run state of img2img / inpainting inside the denoising loop (Sampler._denoise)."""

    def __init__(self, inputs: ImageInputs, noise: np.ndarray, sched: Any, steps: int, cfg: bool,
                 encode: Callable[[np.ndarray], np.ndarray], scaling_factor: float, latents_mean: tuple[float, ...] | None,
                 latents_std: tuple[float, ...] | None, unet_channels: int) -> None:
        self.inputs, self.noise, self.sched = inputs, noise, sched
        self.nine = unet_channels != LATENT_CHANNELS
        check_steps_left(steps, inputs.strength)
        self.start = int(sched.begin_index(steps, inputs.strength))  # x order: Heun's timesteps are doubled
        batch = noise.shape[0]
        f = inputs.image.shape[2] // noise.shape[2]
        full = inputs.strength == 1.0
        self.image_latents: np.ndarray | None = None
        self.latent_mask: np.ndarray | None = None
        self.extra: np.ndarray | None = None
        if not inputs.inpaint:  # img2img: latents_mean/std apply (StableDiffusionXLImg2ImgPipeline.prepare_latents)
            self.image_latents = np.repeat(scale_latents(posterior_mean(encode(inputs.image)), scaling_factor, latents_mean, latents_std), batch, 0)
            return
        assert inputs.mask is not None
        self.latent_mask = np.repeat(inputs.mask[:, :, ::f, ::f], batch, 0)  # torch interpolate "nearest" at an integer factor
        if not self.nine or not full:  # the inpainting pipeline's _encode_vae_image: the scaling factor only
            self.image_latents = np.repeat(scale_latents(posterior_mean(encode(inputs.image)), scaling_factor), batch, 0)
        if self.nine:
            masked = (inputs.image * (inputs.mask < 0.5)).astype(F32)
            masked_latents = np.repeat(scale_latents(posterior_mean(encode(masked)), scaling_factor), batch, 0)
            extra = np.concatenate([self.latent_mask, masked_latents], axis=1)
            self.extra = np.concatenate([extra, extra]) if cfg else extra

    def initial_latents(self) -> np.ndarray:
        """The latents the loop starts from at index `start`."""
        if self.inputs.inpaint and self.inputs.strength == 1.0:
            return (self.noise * self.sched.init_noise_sigma).astype(F32, copy=False)
        assert self.image_latents is not None
        return add_noise(self.sched, self.image_latents, self.noise, self.start)

    def unet_input(self, x: np.ndarray) -> np.ndarray:
        """The U-Net's `sample`: the scaled latents, with mask and masked-image latents for 9 channels."""
        return x if self.extra is None else np.concatenate([x, self.extra], axis=1)

    def after_step(self, latents: np.ndarray, index: int, last: bool) -> np.ndarray:
        """4-channel inpainting: the known region back to the image's latents noised to the next step."""
        if not self.inputs.inpaint or self.nine:
            return latents
        assert self.image_latents is not None and self.latent_mask is not None
        known = self.image_latents if last else add_noise(self.sched, self.image_latents, self.noise, index + 1)
        m = self.latent_mask
        return ((F32(1.0) - m) * known + m * latents).astype(F32, copy=False)
