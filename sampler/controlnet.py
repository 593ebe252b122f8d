"""ControlNet in the numpy sampler, as diffusers' StableDiffusionXLControlNetPipeline does it with one
ControlNet and guess_mode off: the control image resized to the output size (PIL, Lanczos), made RGB
and scaled to [0, 1] (its control_image_processor: no normalization), repeated per image and doubled
for classifier-free guidance; at step i of n the ControlNet runs on the U-Net's own inputs with scale
`controlnet_conditioning_scale` while i/n >= control_guidance_start and (i+1)/n <= control_guidance_end,
and its residuals go to the `unet_controlnet` U-Net; outside that window the residuals are zero (the
ControlNet's output at scale 0), so it is not run.

numpy and PIL only; the loop (sampler/loop.py) calls `plan_control` in its plan and `residuals` per step.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from exporter.controlnet import CONTROLNET_COMPONENTS
from koala_core.errors import UsageError

F32 = np.float32
ENCODED = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG and JPEG signatures
CONTROLNET, UNET_CONTROLNET = CONTROLNET_COMPONENTS


@dataclass(frozen=True)
class ControlPlan:
    """A validated ControlNet request: the prepared image for the U-Net batch and the schedule."""

    image: np.ndarray  # float32 [unet batch, 3, height, width] in [0, 1]
    scale: float  # controlnet_conditioning_scale
    start: float  # control_guidance_start
    end: float  # control_guidance_end

    def keep(self, i: int, n: int) -> float:
        """diffusers' controlnet_keep[i] for n steps: 1.0 inside [start, end], else 0.0."""
        return 1.0 - float(i / n < self.start or (i + 1) / n > self.end)


def to_pil(image: Any, what: str = "control image") -> Any:
    """A PIL image from what a request may carry: a PIL image, PNG/JPEG bytes, a path, a uint8 array
    [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], or a uint8 array [N] / [1, 1, N] holding the bytes of a PNG
    or JPEG file (how a Triton UINT8 input carries one); UsageError saying what is expected otherwise."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.size >= 8 and (
            image.ndim == 1 or (image.ndim == 3 and image.shape[:2] == (1, 1))) and bytes(image.reshape(-1)[:8]).startswith(ENCODED):
        image = image.tobytes()
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise UsageError(f"{what}: no such file {path}")
        image = path.read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            img = Image.open(io.BytesIO(bytes(image)))
            img.load()  # a truncated file fails here, not later
            return img
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise UsageError(f"{what}: not a readable image ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))) or 0 in image.shape:
            raise UsageError(f"{what}: expected a uint8 image [H, W], [H, W, 3] or [H, W, 4], got {image.dtype} {list(image.shape)}")
        return Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    raise UsageError(f"{what}: expected an image (PNG bytes, a PIL image or a uint8 array), got {type(image).__name__}")


def prepare_image(image: Any, height: int, width: int) -> np.ndarray:
    """float32 [1, 3, height, width] in [0, 1]: diffusers' VaeImageProcessor(do_convert_rgb=True,
    do_normalize=False).preprocess for a PIL image: resize (Lanczos) first, then RGB, then / 255."""
    from PIL import Image

    img = to_pil(image)
    if img.size != (width, height):
        img = img.resize((width, height), resample=Image.Resampling.LANCZOS)
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return (rgb.astype(F32) / F32(255.0)).transpose(2, 0, 1)[None].copy()


def require_controlnet(components: Any, origin: str) -> None:
    """A control image needs the ControlNet pair among `components` (names): else one line saying how to export it."""
    missing = [c for c in CONTROLNET_COMPONENTS if c not in components]
    if missing:
        raise UsageError(f"a control image needs a ControlNet, and {origin} has no {' or '.join(missing)}; "
                         "export one with `koala-trt export --controlnet DIR_OR_HUB_ID`")


def plan_control(specs: Mapping[str, Any], image: Any, scale: float | None, start: float | None, end: float | None,
                 height: int, width: int, batch: int, cfg: bool, origin: str = "the artifacts") -> ControlPlan | None:
    """Check the ControlNet fields of a request and prepare the image; None without a control image.
    Raises UsageError (a control image with no ControlNet, a scale or window diffusers would refuse)."""
    if image is None:
        if scale is not None or start is not None or end is not None:
            raise UsageError("--controlnet-scale / --control-guidance-start / --control-guidance-end need --control-image")
        return None
    require_controlnet(specs, origin)
    scale = 1.0 if scale is None else float(scale)
    start = 0.0 if start is None else float(start)
    end = 1.0 if end is None else float(end)
    if not math.isfinite(scale):
        raise UsageError(f"--controlnet-scale must be a finite number (got {scale})")
    if not (0.0 <= start < end <= 1.0):
        raise UsageError(f"--control-guidance-start and --control-guidance-end must satisfy 0 <= start < end <= 1 (got {start:g}, {end:g})")
    one = prepare_image(image, height, width)
    expected = int(specs[CONTROLNET].input("controlnet_cond").dims[1])
    if one.shape[1] != expected:  # a ControlNet with other conditioning channels
        raise UsageError(f"the ControlNet takes {expected}-channel control images, not RGB")
    rows = np.repeat(one, batch, axis=0)
    return ControlPlan(np.concatenate([rows, rows]) if cfg else rows, scale, start, end)


def residuals(run: Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]], specs: Mapping[str, Any], control: ControlPlan,
              i: int, n: int, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The unet_controlnet's residual inputs at step i of n, from the ControlNet run on the U-Net's
    `feeds` (or zeros outside the guidance window, what the ControlNet gives at scale 0)."""
    unet = specs[UNET_CONTROLNET]
    names = [t.name for t in unet.inputs if t.name not in feeds]
    scale = control.scale * control.keep(i, n)
    if scale == 0.0:
        b, h, w = feeds["sample"].shape[0], feeds["sample"].shape[2], feeds["sample"].shape[3]
        shapes = unet.input_shapes(b, h * unet.latent_factor, w * unet.latent_factor)
        return {k: np.zeros(shapes[k], F32) for k in names}
    out = run(CONTROLNET, {**feeds, "controlnet_cond": control.image, "conditioning_scale": np.array([scale], F32)})
    produced = [t.name for t in specs[CONTROLNET].outputs]
    return dict(zip(names, (out[k] for k in produced)))
