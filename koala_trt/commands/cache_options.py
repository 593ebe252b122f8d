"""--cache-interval / --cache-branch (feature caching, sampler/feature_cache.py) for generate,
validate, bench and serve: one declaration, one record of what ran."""

from __future__ import annotations

from typing import Any, Callable

import click


def cache_options() -> Callable[..., Any]:
    """The two options, checked by the sampler's plan (sampler.feature_cache.check_cache), which says
    what is wrong in one line before any network runs."""

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--cache-branch", type=int,
                         help="Where the U-Net is split for caching (3 x up block + layer, DeepCache's cache_branch_id) "
                              "[default: the branch `export --cache-branch` split it at].")(f)
        return click.option("--cache-interval", type=int, default=1, show_default=True,
                            help="Feature caching (DeepCache): the full U-Net every N steps, only its shallow branch in "
                                 "between; 1 = off. Needs artifacts exported with --cache-branch.")(f)

    return deco


def cache_record(plan: Any, timings: Any) -> dict[str, Any] | None:
    """What caching did in a run: interval, branch, full (deep) and shallow U-Net steps; None when off."""
    if plan.cache_interval <= 1:
        return None
    calls = len(timings.stages.get("unet", []))
    deep = -(-calls // plan.cache_interval)
    return {"interval": plan.cache_interval, "branch": plan.cache_branch, "deep_steps": deep, "shallow_steps": calls - deep}
