"""Feature caching in the image loop (DeepCache, Ma et al. 2023): on refresh steps (step index
i % interval == 0, as DeepCacheSDHelper's "uniform" mode) `unet_deep` runs the whole U-Net and
returns the hidden state entering the cache branch's up-block layer; on the steps in between
`unet_shallow` runs only the shallow branch from that cached feature. The graphs and the branch's
geometry: exporter/specs.py (UNetSpec.cache_variants), exporter/cache_branch.py.

numpy only; the loop (sampler/loop.py) calls `check_cache` from its plan and `FeatureCache.unet`
per step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from exporter.cache_branch import cache_branch, check_interval
from exporter.specs import CACHE_COMPONENTS, ComponentSpec
from koala_core.errors import UsageError

Run = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]


def check_cache(specs: Mapping[str, ComponentSpec], interval: object, branch: object, scheduler: Any,
                unet_config: Mapping[str, Any] | None = None, backend: Any = None) -> tuple[int, int | None]:
    """(interval, branch) of a request, or UsageError: interval a whole number >= 1 (1: off); a
    branch the U-Net has and its graphs were split at; both graphs present; a scheduler that calls
    the U-Net once per step. `backend`: the torch reference splits at any branch on request."""
    n = check_interval(interval)
    if n == 1:
        if branch is not None:
            raise UsageError("--cache-branch needs --cache-interval N > 1 (caching is off at 1)")
        return 1, None
    if unet_config:
        if branch is not None:
            cache_branch(unet_config, branch)  # type: ignore[arg-type]  # a branch this U-Net does not have
    elif isinstance(branch, bool) or not (branch is None or isinstance(branch, int)):
        raise UsageError(f"--cache-branch must be a whole number (got {branch!r})")
    if getattr(scheduler, "order", 1) != 1:
        raise UsageError(f"--cache-interval needs a scheduler that calls the U-Net once per step; "
                         f"{type(scheduler).__name__} calls it {scheduler.order} times (use euler or dpmpp_2m_karras)")
    set_branch = getattr(backend, "set_cache_branch", None)
    if set_branch is not None and branch is not None:  # the torch reference: split where asked
        set_branch(int(branch))  # type: ignore[arg-type]
        specs = {**specs, **backend.specs}
    have = [c for c in CACHE_COMPONENTS if c in specs]
    if len(have) < 2:
        fix = ("rebuild the engines with both" if have else
               "re-export with `koala-trt export --cache-branch B` (and convert/build the pair like the unet)")
        raise UsageError(f"--cache-interval {n} needs the U-Net pair unet_deep and unet_shallow; "
                         f"{'only ' + have[0] + ' is there' if have else 'neither is there'}: {fix}")
    split = int(specs["unet_deep"].extra["cache_branch"])
    if int(specs["unet_shallow"].extra.get("cache_branch", -1)) != split:
        raise UsageError(f"unet_deep is split at branch {split} but unet_shallow at "
                         f"{specs['unet_shallow'].extra.get('cache_branch')}: re-export them together")
    if branch is not None and branch != split:
        raise UsageError(f"--cache-branch {branch}: the cached U-Net graphs here are split at branch {split}; "
                         f"pass --cache-branch {split} or re-export with `koala-trt export --cache-branch {branch}`")
    return n, split


class FeatureCache:
    """One request's cache: which steps refresh and the feature carried between them."""

    def __init__(self, interval: int, shallow: ComponentSpec) -> None:
        self.interval, self.shallow = interval, shallow
        self.feature: np.ndarray | None = None
        self.deep_steps = self.shallow_steps = 0

    def refresh(self, i: int) -> bool:
        return self.feature is None or i % self.interval == 0

    def unet(self, i: int, feeds: dict[str, np.ndarray], run: Run) -> np.ndarray:
        """The U-Net's out_sample at step `i`: unet_deep on a refresh step (keeping its feature),
        else unet_shallow from the kept feature."""
        if self.refresh(i):
            out = run("unet_deep", feeds)
            self.feature, self.deep_steps = out["deep_feature"], self.deep_steps + 1
            return out["out_sample"]
        assert self.feature is not None
        self.shallow_steps += 1
        shallow = {t.name: feeds[t.name] for t in self.shallow.inputs if t.name != "deep_feature"}
        return run("unet_shallow", {**shallow, "deep_feature": self.feature})["out_sample"]
