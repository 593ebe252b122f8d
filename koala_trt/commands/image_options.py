"""--image, --strength and --mask (img2img and inpainting, sampler/img2img.py), shared by generate and validate."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from koala_core.errors import UsageError


def image_options() -> Callable[[Any], Any]:
    def wrap(f: Any) -> Any:
        f = click.option("--mask", type=click.Path(path_type=Path),
                         help="Inpainting with --image: a mask of the image's size, white = repaint, black = keep (binarized at 50%).")(f)
        f = click.option("--strength", type=float,
                         help="With --image: how much to change it, in (0, 1]; the last int(steps x strength) steps run "
                              "[default: 0.3; 0.9999 with --mask].")(f)
        return click.option("--image", type=click.Path(path_type=Path),
                            help="img2img: start from this PNG/JPEG (converted to RGB; sets the default size, rounded down to a "
                                 "multiple of 8) instead of pure noise.")(f)
    return wrap


def image_args(image: Path | None, mask: Path | None, strength: float | None) -> dict[str, Any]:
    """--image/--mask read and decoded, --strength checked (sampler/img2img.py), before any model loads:
    sampler.loop.Request's fields image, mask_image, strength ({} without --image)."""
    from sampler.img2img import check_strength, open_image

    if image is None:
        for flag, v in (("--mask", mask), ("--strength", strength)):
            if v is not None:
                raise UsageError(f"{flag} needs --image (img2img or inpainting)")
        return {}
    if strength is not None:
        check_strength(strength)
    return {"image": open_image(image, "--image"), "mask_image": open_image(mask, "--mask") if mask is not None else None,
            "strength": strength}
