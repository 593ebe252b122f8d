"""The Euler discrete scheduler in numpy, step for step what diffusers' EulerDiscreteScheduler does.

Background. The sampler integrates the probability-flow ODE of a variance-exploding diffusion,
dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", eq. 1-3), with Euler's method (their Algorithm 1 without the
second-order correction and, as diffusers defaults to, without churn). A latent-diffusion model
trained with DDPM's variance-preserving noise (Ho et al. 2020) maps onto it through
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) and x_VE = x_VP * sqrt(1 + sigma^2); this is why
the U-Net input is divided by sqrt(sigma^2 + 1) (`scale_model_input`).

Which 1000-step training timesteps are visited is the "timestep spacing" of Lin et al. 2023
("Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2): linspace, leading
(+ steps_offset) and trailing. Sigmas at fractional timesteps are interpolated linearly in t.

Numerics. diffusers builds its tables with torch in float32 (linspace, square, a cumulative
product accumulated in float64) and steps in float32. This module reproduces those roundings in
numpy, so the schedule and every step agree with diffusers to float32 rounding (tests assert
1e-6), with no torch at run time. The configuration is diffusers' scheduler_config.json. The
helpers shared with the other schedulers (betas, spacings, Karras sigmas, sigma -> t) are in common.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from koala_core.errors import UsageError
from sampler.schedulers.common import (F32, SPACINGS, Scheduler, alphas_cumprod, karras_sigmas, linspace_f32, sigma_to_t,
                                       spaced_timesteps, train_sigmas)


@dataclass
class EulerDiscreteScheduler(Scheduler):
    """Euler sampling as diffusers' EulerDiscreteScheduler with its default step (no churn).

    Usage, as the SDXL pipeline drives it:
        s = EulerDiscreteScheduler.from_config(cfg); s.set_timesteps(steps)
        x = noise * s.init_noise_sigma
        for i, t in enumerate(s.timesteps):
            eps = unet(s.scale_model_input(x, i), t)
            x = s.step(eps, i, x)
    Steps are addressed by index (the pipeline starts at index 0, `set_begin_index(0)`).
    """

    name = "euler"

    num_train_timesteps: int
    alphas_cumprod: np.ndarray  # float32 [T]
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"

    timesteps: np.ndarray | None = None  # float32 [n]
    sigmas: np.ndarray | None = None  # float32 [n + 1], the last one 0 (or sigma_min)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "EulerDiscreteScheduler":
        """From a diffusers scheduler_config.json (EulerDiscreteScheduler's keys and defaults)."""
        unsupported = [k for k in ("use_exponential_sigmas", "use_beta_sigmas", "rescale_betas_zero_snr") if cfg.get(k)]
        if cfg.get("timestep_type", "discrete") != "discrete":
            unsupported.append(f"timestep_type={cfg['timestep_type']}")
        if unsupported:
            raise UsageError(f"scheduler: {', '.join(unsupported)} is not supported by the numpy Euler scheduler")
        pred = cfg.get("prediction_type", "epsilon")
        if pred not in ("epsilon", "v_prediction", "sample", "original_sample"):
            raise UsageError(f"scheduler: prediction_type {pred!r} is not supported (epsilon, v_prediction, sample)")
        spacing = cfg.get("timestep_spacing", "linspace")
        if spacing not in SPACINGS:
            raise UsageError(f"scheduler: timestep_spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
        interp = cfg.get("interpolation_type", "linear")
        if interp not in ("linear", "log_linear"):
            raise UsageError(f"scheduler: interpolation_type {interp!r} is not one of linear, log_linear")
        final = cfg.get("final_sigmas_type", "zero") or "zero"
        if final not in ("zero", "sigma_min"):
            raise UsageError(f"scheduler: final_sigmas_type {final!r} is not one of zero, sigma_min")
        return cls(num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)), alphas_cumprod=alphas_cumprod(cfg),
                   prediction_type=pred, timestep_spacing=spacing, steps_offset=int(cfg.get("steps_offset", 0) or 0),
                   interpolation_type=interp, use_karras_sigmas=bool(cfg.get("use_karras_sigmas", False)),
                   sigma_min=cfg.get("sigma_min"), sigma_max=cfg.get("sigma_max"), final_sigmas_type=final)

    # ----- the schedule -------------------------------------------------------------------------
    def train_sigmas(self) -> np.ndarray:
        """sigma_t for t = 0..T-1, float32 (common.train_sigmas)."""
        return train_sigmas(self.alphas_cumprod)

    def spaced_timesteps(self, steps: int) -> np.ndarray:
        """The training timesteps visited, first (noisiest) to last (common.spaced_timesteps)."""
        return spaced_timesteps(self.timestep_spacing, self.num_train_timesteps, steps, self.steps_offset)

    def set_timesteps(self, steps: int) -> None:
        """Timesteps and sigmas for `steps` inference steps (diffusers' set_timesteps(num_inference_steps))."""
        self._check_steps(steps)
        timesteps = self.spaced_timesteps(steps)
        train = self.train_sigmas()
        if self.interpolation_type == "linear":
            # sigma(t) at fractional t: piecewise linear between the training sigmas.
            sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        else:  # log_linear: sigmas evenly spaced in log sigma from sigma_min to sigma_max
            lo, hi = np.log(train[-1]), np.log(train[0])
            sigmas = np.exp(linspace_f32(float(lo), float(hi), steps + 1)).astype(F32)
        if self.use_karras_sigmas:
            # Karras et al. 2022, eq. 5 between the schedule's own ends (or the config's sigma_min/max).
            smin = self.sigma_min if self.sigma_min is not None else float(sigmas[-1])
            smax = self.sigma_max if self.sigma_max is not None else float(sigmas[0])
            sigmas = karras_sigmas(smin, smax, steps)
            timesteps = sigma_to_t(sigmas, np.log(train))
        last = float(np.sqrt((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0])) if self.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(F32)
        self.timesteps = np.asarray(timesteps).astype(F32)

    def _ready(self) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        if self.sigmas is None or self.timesteps is None:
            raise RuntimeError("call set_timesteps(steps) first")
        return self.timesteps, self.sigmas

    @property
    def init_noise_sigma(self) -> np.float32:
        """Standard deviation of the initial latents: sigma_max for linspace/trailing spacing, and
        sqrt(sigma_max^2 + 1) for leading (diffusers' convention)."""
        _, sigmas = self._ready()
        smax = F32(sigmas.max())
        if self.timestep_spacing in ("linspace", "trailing"):
            return smax
        return F32(np.sqrt(F32(smax * smax + F32(1.0))))

    # ----- one step -----------------------------------------------------------------------------
    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        """x / sqrt(sigma^2 + 1): the VE latent back to the VP scale the U-Net was trained on."""
        _, sigmas = self._ready()
        s = sigmas[index]
        return (sample / np.sqrt(F32(s * s + F32(1.0)))).astype(F32, copy=False)

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """One Euler step from sigma_i to sigma_{i+1} (Karras et al. 2022, Algorithm 1, line 5-8
        with gamma = 0): x0 = denoised(x, eps); d = (x - x0) / sigma_i; x' = x + d (sigma_{i+1} - sigma_i)."""
        _, sigmas = self._ready()
        sample = sample.astype(F32, copy=False)
        sigma = sigmas[index]
        sigma_hat = F32(sigma * F32(1.0))  # churn gamma = 0
        if self.prediction_type == "epsilon":
            pred_x0 = sample - sigma_hat * model_output
        elif self.prediction_type == "v_prediction":
            # Salimans & Ho 2022: x0 = -sigma/sqrt(sigma^2+1) * v + x / (sigma^2 + 1) in VE coordinates.
            s2p1 = F32(sigma * sigma + F32(1.0))
            pred_x0 = model_output * F32(-sigma / np.sqrt(s2p1)) + sample / s2p1
        else:  # "sample": the model predicts x0 directly
            pred_x0 = model_output
        derivative = (sample - pred_x0) / sigma_hat
        dt = F32(sigmas[index + 1] - sigma_hat)
        return (sample + derivative * dt).astype(model_output.dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:
        """x = x0 + sigma_i * noise: the VE forward process at step `index` (img2img's start)."""
        _, sigmas = self._ready()
        return (original + noise * sigmas[index]).astype(F32, copy=False)
