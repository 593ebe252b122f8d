"""Euler ancestral in numpy, step for step what diffusers' EulerAncestralDiscreteScheduler does.

An Euler step of the probability-flow ODE down to sigma_down, then fresh noise of standard deviation
sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_{i+1}^2 (the ancestral sampler of Song et al. 2021,
"Score-Based Generative Modeling through SDEs", as k-diffusion's sample_euler_ancestral writes it with
eta = 1; Karras et al. 2022's Euler step, eq. 1-3, for the deterministic part). Being stochastic, each
step takes its noise from the caller (sampler/schedulers/noise.py).

The schedule is Euler's default one (sigmas interpolated linearly in t, the last one 0); diffusers'
EulerAncestralDiscreteScheduler has no Karras or log-linear option.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sampler.schedulers.common import F32, alphas_cumprod, check_config, config_for
from sampler.schedulers.euler import EulerDiscreteScheduler

# diffusers' EulerAncestralDiscreteScheduler.__init__ arguments and defaults
DEFAULTS: dict[str, Any] = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
                                prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False)


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Euler ancestral: Euler's schedule and scaling, a stochastic step."""

    name = "euler_a"
    stochastic = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "EulerAncestralDiscreteScheduler":
        """From a diffusers scheduler config, as EulerAncestralDiscreteScheduler.from_config reads it."""
        c = config_for(cfg, DEFAULTS)
        check_config(c, cls.name, unsupported=("rescale_betas_zero_snr",), predictions=("epsilon", "v_prediction"))
        return cls(num_train_timesteps=int(c["num_train_timesteps"]), alphas_cumprod=alphas_cumprod(c), prediction_type=c["prediction_type"],
                   timestep_spacing=c["timestep_spacing"], steps_offset=int(c["steps_offset"] or 0))

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """x0 = denoised(x, eps); sigma_up = sqrt(s1^2 (s0^2 - s1^2) / s0^2), sigma_down = sqrt(s1^2 - sigma_up^2);
        x' = x + (x - x0) / s0 * (sigma_down - s0) + noise * sigma_up."""
        _, sigmas = self._ready()
        noise = self._noise(noise, model_output)
        sample = sample.astype(F32, copy=False)
        sigma, sigma_to = sigmas[index], sigmas[index + 1]
        if self.prediction_type == "epsilon":
            pred_x0 = sample - sigma * model_output
        else:  # v_prediction (Salimans & Ho 2022) in VE coordinates
            s2p1 = F32(sigma * sigma + F32(1.0))
            pred_x0 = model_output * F32(-sigma / np.sqrt(s2p1)) + sample / s2p1
        sigma_up = F32(np.sqrt(F32(F32(sigma_to * sigma_to) * F32(sigma * sigma - sigma_to * sigma_to) / F32(sigma * sigma))))
        sigma_down = F32(np.sqrt(F32(sigma_to * sigma_to - sigma_up * sigma_up)))
        derivative = (sample - pred_x0) / sigma
        prev = sample + derivative * F32(sigma_down - sigma)
        return (prev + noise * sigma_up).astype(model_output.dtype, copy=False)
