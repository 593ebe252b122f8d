"""The memory-aid options shared by `plan` and `build` (tiled VAE decode, residency, weight streaming),
and the run-time --vae-tile of `generate` and `bench`."""

from __future__ import annotations

from typing import Any, Callable

import click

from koala_core.errors import UsageError


def aid_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed([
        click.option("--vae-tile", type=int, metavar="PX",
                     help="Decode the VAE in tiles of PX pixels (multiple of 8, not larger than the image) [profile's vae.tile]."),
        click.option("--residency", type=click.Choice(["resident", "sequential"]),
                     help="All engines on the device, or one at a time [profile's runtime.residency]."),
        click.option("--weight-streaming", is_flag=True,
                     help="Streamable engines (WEIGHT_STREAMING): weights beyond a device budget stream from host memory."),
        click.option("--weight-streaming-budget", type=float, metavar="GIB",
                     help="Device memory kept for the U-Net's weights (implies --weight-streaming) [the planner's "
                          "largest budget that fits]."),
    ]):
        f = opt(f)
    return f


def apply_aids(profile: Any, vae_tile: int | None, residency: str | None, weight_streaming: bool,
               weight_streaming_budget: float | None) -> Any:
    """The profile with the aids the command line asks for (each checked, errors naming the flag)."""
    return profile.with_aids(tile=vae_tile, residency=residency, weight_streaming=True if weight_streaming else None,
                             budget_gib=weight_streaming_budget)


def vae_tile_option() -> Callable[..., Any]:
    """--vae-tile for the commands that run the sampler (`generate`, `bench`)."""
    return click.option("--vae-tile", type=int, metavar="PX",
                        help="Decode the VAE in overlapping tiles of PX x PX pixels (a multiple of 8, not larger than the "
                             "image), so its memory stays a tile's however large the image [default: untiled; a TensorRT "
                             "VAE built for a profile's [vae] tile: that tile].")


def check_vae_tile(vae_tile: int | None) -> None:
    """--vae-tile's own form, before any model work (its size against the image once the plan knows it)."""
    if vae_tile is None:
        return
    from exporter.specs import check_tile

    try:
        check_tile(vae_tile)
    except ValueError as e:
        raise UsageError(f"--vae-tile {e}") from None
