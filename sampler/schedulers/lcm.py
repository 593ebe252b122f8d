"""LCM multistep sampling in numpy, step for step what diffusers' LCMScheduler does.

Luo et al. 2023, "Latent Consistency Models", Algorithm 3 (multistep latent consistency sampling): at
each step the consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t) (their eq. 9, with the
boundary scalings of Song et al. 2023, c_skip = sd^2 / ((s t)^2 + sd^2), c_out = s t / sqrt((s t)^2 + sd^2),
sd = 0.5, s = timestep_scaling) gives the denoised latent, which is noised again to the next timestep
with fresh noise, x' = sqrt(alpha_bar_prev) f + sqrt(1 - alpha_bar_prev) z; the last step returns f.
The timesteps are a subset of the distillation schedule (original_inference_steps, 50 by default), so
at most that many steps; as in diffusers, the config's timestep_spacing plays no part. For
LCM-distilled weights or an LCM-LoRA; the step noise comes from the caller (sampler/schedulers/noise.py).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from koala_core.errors import UsageError
from sampler.schedulers.common import F32, Scheduler, alphas_cumprod, check_config, config_for
from sampler.schedulers.ddim import vp_add_noise

# diffusers' LCMScheduler.__init__ arguments and defaults
DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", trained_betas=None,
    original_inference_steps=50, clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
    prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading",
    timestep_scaling=10.0, rescale_betas_zero_snr=False)
SIGMA_DATA = 0.5


class LCMScheduler(Scheduler):
    """Latent consistency model sampling (stochastic between steps)."""

    name = "lcm"
    stochastic = True

    def __init__(self, c: Mapping[str, Any]) -> None:
        self.num_train_timesteps = int(c["num_train_timesteps"])
        self.alphas_cumprod = alphas_cumprod(c)
        self.final_alpha_cumprod = F32(1.0) if c["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.original_steps = int(c["original_inference_steps"])
        self.prediction_type: str = c["prediction_type"]
        self.timestep_spacing = "lcm"  # its own schedule (the config's spacing is not used, as in diffusers)
        self.timestep_scaling = float(c["timestep_scaling"])
        self.clip_sample, self.clip_sample_range = bool(c["clip_sample"]), float(c["clip_sample_range"])
        self.timesteps: np.ndarray | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "LCMScheduler":
        """From a diffusers scheduler config, as LCMScheduler.from_config reads it."""
        c = config_for(cfg, DEFAULTS)
        check_config(c, cls.name, unsupported=("thresholding", "rescale_betas_zero_snr"))
        if not 1 <= int(c["original_inference_steps"]) <= int(c["num_train_timesteps"]):
            raise UsageError(f"scheduler lcm: original_inference_steps={c['original_inference_steps']} must be between 1 and num_train_timesteps")
        return cls(c)

    def set_timesteps(self, steps: int) -> None:
        """`steps` of the distillation schedule k-1, 2k-1, ..., T-1 (k = T // original_inference_steps),
        evenly picked from its noisy end (diffusers' set_timesteps with strength 1)."""
        if not 1 <= steps <= self.original_steps:
            raise UsageError(f"steps must be between 1 and {self.original_steps} for lcm (its original_inference_steps; got {steps})")
        k = self.num_train_timesteps // self.original_steps
        origin = (np.arange(1, self.original_steps + 1) * k - 1)[::-1].copy()
        picks = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[picks].astype(np.int64)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:
        """The VP forward process at timestep timesteps[index]."""
        return vp_add_noise(self.alphas_cumprod, original, noise, int(self._ready()[index]))

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """f = c_skip x + c_out x0 (Luo et al. 2023, eq. 9); then, but at the last step, f noised to the
        next timestep with `noise` (Algorithm 3, line 6)."""
        timesteps = self._ready()
        t = int(timesteps[index])
        last = index == len(timesteps) - 1
        prev_t = t if last else int(timesteps[index + 1])
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_prev = F32(F32(1.0) - a_t), F32(F32(1.0) - a_prev)
        st = F32(F32(t) * F32(self.timestep_scaling))
        den = F32(F32(st * st) + F32(SIGMA_DATA ** 2))
        c_skip = F32(F32(SIGMA_DATA ** 2) / den)
        c_out = F32(st / F32(np.sqrt(den)))
        sa, sb = F32(np.sqrt(a_t)), F32(np.sqrt(b_t))
        if self.prediction_type == "epsilon":
            x0 = (sample - sb * model_output) / sa
        elif self.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = sa * sample - sb * model_output
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        denoised = c_out * x0 + c_skip * sample
        if last:
            return denoised.astype(F32, copy=False)
        z = self._noise(noise, model_output)
        return (F32(np.sqrt(a_prev)) * denoised + F32(np.sqrt(b_prev)) * z).astype(F32, copy=False)
