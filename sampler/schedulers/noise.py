"""The noise the stochastic schedulers (euler_a, lcm) add at each step, from numpy only.

Image k of a request with seed s draws its step noise from its own stream: numpy's PCG64 seeded with
SeedSequence(s + k, spawn_key=(1,)), one standard-normal latent (float32, C x h x w) per step, in step
order. The stream is independent of the initial noise (PCG64 seeded with s + k, sampler.loop.initial_noise)
and, like it, per image, so image k of a batch equals a batch-1 run with seed s + k. diffusers draws
this noise inside `step` with torch's generator; the tests hand it these same tensors instead.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
STREAM = 1  # SeedSequence spawn key of the step-noise stream


class StepNoise:
    """Callable: the next step's noise, float32 [batch, *shape]."""

    def __init__(self, seed: int, batch: int, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.rngs = [np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed + k, spawn_key=(STREAM,)))) for k in range(batch)]

    def __call__(self) -> np.ndarray:
        return np.stack([rng.standard_normal(self.shape, dtype=F32) for rng in self.rngs])
