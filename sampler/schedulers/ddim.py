"""DDIM in numpy, step for step what diffusers' DDIMScheduler does as the SDXL pipeline calls it (eta = 0).

Song et al. 2020, "Denoising Diffusion Implicit Models", eq. 12 with sigma_t = 0 (deterministic):
    x_prev = sqrt(alpha_bar_prev) x0(x_t) + sqrt(1 - alpha_bar_prev) eps(x_t),
    x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t),
over integer timesteps; the previous timestep is t - T // steps (diffusers' rule, whatever the
spacing), and past t = 0 alpha_bar is 1 (set_alpha_to_one) or alpha_bar_0. Works in VP coordinates:
the initial noise is not scaled and the U-Net input is x itself.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sampler.schedulers.common import F32, Scheduler, alphas_cumprod, check_config, config_for

# diffusers' DDIMScheduler.__init__ arguments and defaults
DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None, clip_sample=True,
    set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
    clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading", rescale_betas_zero_snr=False)


def vp_add_noise(ac: np.ndarray, original: np.ndarray, noise: np.ndarray, t: int) -> np.ndarray:
    """sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (Ho et al. 2020, eq. 4), float32."""
    a = ac[t]
    return (F32(np.sqrt(a)) * original + F32(np.sqrt(F32(F32(1.0) - a))) * noise).astype(F32, copy=False)


def ddim_timesteps(spacing: str, train_steps: int, steps: int, steps_offset: int) -> np.ndarray:
    """DDIM's integer timesteps, first to last (Lin et al. 2023, Table 2)."""
    if spacing == "linspace":
        return np.linspace(0, train_steps - 1, steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = train_steps // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    return np.round(np.arange(train_steps, 0, -train_steps / steps)).astype(np.int64) - 1


class DDIMScheduler(Scheduler):
    """Deterministic DDIM (eta = 0)."""

    name = "ddim"

    def __init__(self, c: Mapping[str, Any]) -> None:
        self.num_train_timesteps = int(c["num_train_timesteps"])
        self.alphas_cumprod = alphas_cumprod(c)
        self.final_alpha_cumprod = F32(1.0) if c["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.prediction_type: str = c["prediction_type"]
        self.timestep_spacing: str = c["timestep_spacing"]
        self.steps_offset = int(c["steps_offset"] or 0)
        self.clip_sample, self.clip_sample_range = bool(c["clip_sample"]), float(c["clip_sample_range"])
        self.timesteps: np.ndarray | None = None
        self._stride = 1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "DDIMScheduler":
        """From a diffusers scheduler config, as DDIMScheduler.from_config reads it."""
        c = config_for(cfg, DEFAULTS)
        check_config(c, cls.name, unsupported=("thresholding", "rescale_betas_zero_snr"))
        return cls(c)

    def set_timesteps(self, steps: int) -> None:
        self._check_steps(steps)
        self.timesteps = ddim_timesteps(self.timestep_spacing, self.num_train_timesteps, steps, self.steps_offset)
        self._stride = self.num_train_timesteps // steps

    def add_noise(self, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:
        """The VP forward process at timestep timesteps[index]."""
        return vp_add_noise(self.alphas_cumprod, original, noise, int(self._ready()[index]))

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Song et al. 2020, eq. 12 with sigma = 0."""
        t = int(self._ready()[index])
        prev_t = t - self._stride
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = F32(F32(1.0) - a_t)
        sa, sb = F32(np.sqrt(a_t)), F32(np.sqrt(b_t))
        if self.prediction_type == "epsilon":
            x0, eps = (sample - sb * model_output) / sa, model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - sa * x0) / sb
        else:  # v_prediction (Salimans & Ho 2022)
            x0, eps = sa * sample - sb * model_output, sa * model_output + sb * sample
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        direction = F32(np.sqrt(F32(F32(1.0) - a_prev))) * eps  # "direction pointing to x_t", eq. 12
        return (F32(np.sqrt(a_prev)) * x0 + direction).astype(F32, copy=False)
