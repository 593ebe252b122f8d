"""The reference of feature caching: the `DeepCache` package's DeepCacheSDHelper (Ma et al. 2023) on
diffusers' pipeline, for `validate --cache-interval` and the tests. Needs the validate or test extra
(DeepCache); imported only when caching is validated.

DeepCacheSDHelper wraps `unet.mid_block` unconditionally, which a U-Net without one (KOALA-700M,
KOALA-Lightning) lacks: a missing block is left unwrapped here. The mid block is always inside the
cached deep part, so this changes nothing else (exporter/cache_branch.py). On the way out every
module's forward is restored (the helper's own disable() leaves the block wrappers in place and
fails without a mid block), so the pipeline serves as the uncached reference again.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def deepcache(pipe: Any, interval: int, branch: int) -> Iterator[Any]:
    """`pipe` with DeepCache on (uniform mode: the full U-Net at step indices that are multiples of
    `interval`, cache branch `branch`) inside the block; the helper is yielded."""
    from DeepCache import DeepCacheSDHelper

    class Helper(DeepCacheSDHelper):  # type: ignore[misc]
        def wrap_block_forward(self, block: Any, *args: Any, **kwargs: Any) -> None:
            if block is not None:  # no mid block (KOALA)
                super().wrap_block_forward(block, *args, **kwargs)

    helper = Helper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        yield helper
    finally:
        for m in pipe.unet.modules():  # the helper sets `forward` on instances: drop those
            m.__dict__.pop("forward", None)
        helper.reset_states()
