"""Heun's method in numpy, step for step what diffusers' HeunDiscreteScheduler does.

Karras et al. 2022, Algorithm 1 (with gamma = 0): an Euler step from sigma_i to sigma_{i+1}, then,
unless sigma_{i+1} = 0, a second U-Net call at sigma_{i+1} and the trapezoidal correction
x_{i+1} = x_i + (d_i + d'_{i+1}) / 2 (sigma_{i+1} - sigma_i). So n steps cost 2n - 1 U-Net calls.

diffusers lays the two calls out as doubled timesteps [t0, t1, t1, t2, t2, ..., t_{n-1}, t_{n-1}] (and
sigmas alike) and steps through them by index, alternating first-order (predict) and second-order
(correct) steps; so does this class, and the loop runs it unchanged. `order` is 2: img2img starts at
index 2 x t_start (diffusers' get_timesteps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from sampler.schedulers.common import F32, alphas_cumprod, check_config, config_for
from sampler.schedulers.euler import EulerDiscreteScheduler

# diffusers' HeunDiscreteScheduler.__init__ arguments and defaults
DEFAULTS: dict[str, Any] = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear", trained_betas=None,
                                prediction_type="epsilon", use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                                clip_sample=False, clip_sample_range=1.0, timestep_spacing="linspace", steps_offset=0)


@dataclass
class HeunDiscreteScheduler(EulerDiscreteScheduler):
    """Heun (2nd order) over Euler's schedule, its timesteps and sigmas doubled as diffusers does."""

    clip_sample: bool = False
    clip_sample_range: float = 1.0
    _prev: tuple[np.ndarray, np.float32, np.ndarray] | None = None  # (derivative, dt, sample) of the pending first-order step

    name = "heun"
    order = 2

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "HeunDiscreteScheduler":
        """From a diffusers scheduler config, as HeunDiscreteScheduler.from_config reads it."""
        c = config_for(cfg, DEFAULTS)
        check_config(c, cls.name, unsupported=("use_exponential_sigmas", "use_beta_sigmas"))
        return cls(num_train_timesteps=int(c["num_train_timesteps"]), alphas_cumprod=alphas_cumprod(c), prediction_type=c["prediction_type"],
                   timestep_spacing=c["timestep_spacing"], steps_offset=int(c["steps_offset"] or 0),
                   use_karras_sigmas=bool(c["use_karras_sigmas"]), clip_sample=bool(c["clip_sample"]),
                   clip_sample_range=float(c["clip_sample_range"]),
                   # diffusers keeps a config's sigma_min/sigma_max although they are no __init__ arguments, and Karras uses them
                   sigma_min=cfg.get("sigma_min"), sigma_max=cfg.get("sigma_max"))

    def set_timesteps(self, steps: int) -> None:
        """Euler's schedule, then every timestep but the first and every sigma but the first and the
        final 0 repeated (diffusers' repeat_interleave(2))."""
        super().set_timesteps(steps)
        t, s = self._ready()
        self.timesteps = np.concatenate([t[:1], np.repeat(t[1:], 2)]).astype(F32)
        self.sigmas = np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]]).astype(F32)
        self._prev = None

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """First order (no pending step): d = (x - x0) / sigma_i, x' = x + d dt, remembered; second order:
        d' at sigma_{i+1} from the new output, x_{i+1} = x_i + (d + d') / 2 dt (Karras et al. 2022, Alg. 1, l. 7-8)."""
        _, sigmas = self._ready()
        first = self._prev is None
        sigma, sigma_next = (sigmas[index], sigmas[index + 1]) if first else (sigmas[index - 1], sigmas[index])
        sigma_in = sigma if first else sigma_next  # the noise level of this model output
        if self.prediction_type == "epsilon":
            pred_x0 = sample - sigma_in * model_output
        elif self.prediction_type == "v_prediction":
            s2p1 = F32(sigma_in * sigma_in + F32(1.0))
            pred_x0 = model_output * F32(-sigma_in / np.sqrt(s2p1)) + sample / s2p1
        else:
            pred_x0 = model_output
        if self.clip_sample:
            pred_x0 = np.clip(pred_x0, -self.clip_sample_range, self.clip_sample_range).astype(F32)
        if first:
            derivative = (sample - pred_x0) / sigma
            dt = F32(sigma_next - sigma)
            self._prev = (derivative, dt, sample)
        else:
            d0, dt, x_i = self._prev  # type: ignore[misc]
            derivative = (d0 + (sample - pred_x0) / sigma_next) / F32(2)
            sample, self._prev = x_i, None
        return (sample + derivative * dt).astype(F32, copy=False)
