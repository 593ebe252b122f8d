"""Feature caching (DeepCache, Ma et al. 2023): where a U-Net splits into the deep part, whose output
is cached on refresh steps, and the shallow part, which runs on every step in between.

Branches are numbered as DeepCache's `cache_branch_id`: branch B is up-block layer c = B % 3 of the
block k = B // 3 levels below full resolution (k counts down blocks from the top; an up block is
named by its mirror down block, and its layers from the output side: layer 0 is the up block's
last). On a cached step DeepCache recomputes conv_in and the time embedding, down blocks 0..k-1,
the first c layers of down block k, then up block k from its layer c (the cached hidden state
entering it), the up blocks above and the output head; everything else (the rest of down block k,
the deeper blocks, the mid block) returns what it returned on the last refresh step. Only the hidden
state that enters up layer c is ever read from that cache, so it is the one tensor carried over.

A U-Net without a mid block (KOALA-700M, KOALA-Lightning) splits the same way: the mid block is
always inside the deep part, so its absence changes nothing here. Branch c <= the up blocks' layer
count - 1 only: KOALA's up blocks have 2 layers (layers_per_block 1), so branches 2, 5, 8 do not
exist there (DeepCache would run them as uncached layers and cache nothing more than 1, 4, 7).

Pure Python (no numpy, no torch): specs.py and the sampler use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from koala_core.errors import UsageError

BRANCH_STRIDE = 3  # DeepCache numbers branches block * 3 + layer (SD's up blocks have 3 layers)


@dataclass(frozen=True)
class CacheBranch:
    """Where one branch splits a U-Net of config `cfg` (diffusers' UNet2DConditionModel config)."""

    branch: int
    block: int  # k: levels below full resolution (0 = the top, full-resolution block)
    layer: int  # c: up-block layer counted from the block's output side
    up_block: int  # diffusers' index of the up block (len(up_blocks) - 1 - k)
    up_layer: int  # diffusers' index of the first up-block layer the shallow part runs
    channels: int  # channels of the cached feature
    scale: int  # the cached feature is latent size / scale
    cross_attention: bool  # does the shallow part have cross-attention (needs encoder_hidden_states)?

    def describe(self) -> str:
        return (f"branch {self.branch} (up block {self.block}, layer {self.layer}: a {self.channels}-channel feature "
                f"at 1/{self.scale} of the latents)")


def _layers(cfg: Mapping[str, Any]) -> list[int]:
    lpb = cfg.get("layers_per_block", 2)
    n = len(cfg["block_out_channels"])
    return [int(v) for v in lpb] if isinstance(lpb, (list, tuple)) else [int(lpb)] * n


def branches(cfg: Mapping[str, Any]) -> list[int]:
    """The branch numbers this U-Net has."""
    return [BRANCH_STRIDE * k + c for k, lpb in enumerate(_layers(cfg)) for c in range(min(lpb + 1, BRANCH_STRIDE))]


def cache_branch(cfg: Mapping[str, Any], branch: int) -> CacheBranch:
    """The split for `branch`; UsageError naming the branches this U-Net has."""
    have = branches(cfg)
    if isinstance(branch, bool) or not isinstance(branch, int) or branch not in have:
        raise UsageError(f"--cache-branch {branch!r}: this U-Net has branches {', '.join(map(str, have))} "
                         f"({len(cfg['block_out_channels'])} up blocks of {', '.join(str(v + 1) for v in _layers(cfg))} layers; "
                         f"branch = {BRANCH_STRIDE} x block + layer, as DeepCache numbers them)")
    k, c = divmod(branch, BRANCH_STRIDE)
    boc = [int(v) for v in cfg["block_out_channels"]]
    n = len(boc)
    lpb = _layers(cfg)[k]
    # Up block k's resnets output boc[k]; its first layer takes the block below's output (boc[k + 1],
    # or the deepest block's output where there is none: the mid block's, or the last down block's).
    channels = boc[k] if c < lpb else boc[min(k + 1, n - 1)]
    down_types = list(cfg.get("down_block_types", []))
    up_types = list(cfg.get("up_block_types", []))
    cross = any("CrossAttn" in t for t in down_types[:k]) or (c > 0 and "CrossAttn" in down_types[k]) \
        or any("CrossAttn" in up_types[n - 1 - j] for j in range(k + 1))
    return CacheBranch(branch, k, c, n - 1 - k, lpb - c, channels, 2 ** k, cross)


def check_interval(interval: object) -> int:
    """--cache-interval: a whole number >= 1 (1: every step runs the full U-Net, no caching)."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise UsageError(f"--cache-interval must be a whole number >= 1 (1: no caching; got {interval!r})")
    return interval
