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
1e-6), with no torch at run time. The configuration is diffusers' scheduler_config.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from koala_core.errors import UsageError

F32 = np.float32
SPACINGS = ("linspace", "leading", "trailing")


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32): endpoints rounded to float32, a float32
    step, values start + i*step in the first half and end - (steps-1-i)*step in the second, each
    rounded once (the fused multiply-add torch's CPU kernel uses; emulated exactly in float64)."""
    s, e = F32(start), F32(end)
    if steps == 1:
        return np.array([s], F32)
    step = F32((e - s) / F32(steps - 1))
    i = np.arange(steps)
    first = np.float64(s) + np.float64(step) * i
    second = np.float64(e) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(F32)


def _betas(cfg: Mapping[str, Any]) -> np.ndarray:
    """beta_t for t = 0..T-1 in float32 (DDPM's linear schedule, or latent diffusion's
    "scaled_linear": linear in sqrt(beta) then squared)."""
    n = int(cfg["num_train_timesteps"])
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], F32)
    schedule = cfg.get("beta_schedule", "linear")
    b0, b1 = float(cfg["beta_start"]), float(cfg["beta_end"])
    if schedule == "linear":
        return _linspace_f32(b0, b1, n)
    if schedule == "scaled_linear":
        r = _linspace_f32(b0 ** 0.5, b1 ** 0.5, n)
        return (r * r).astype(F32)
    if schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), beta capped at 0.999.
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], F32)
    raise UsageError(f"scheduler: beta_schedule {schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")


@dataclass
class EulerDiscreteScheduler:
    """Euler sampling as diffusers' EulerDiscreteScheduler with its default step (no churn).

    Usage, as the SDXL pipeline drives it:
        s = EulerDiscreteScheduler.from_config(cfg); s.set_timesteps(steps)
        x = noise * s.init_noise_sigma
        for i, t in enumerate(s.timesteps):
            eps = unet(s.scale_model_input(x, i), t)
            x = s.step(eps, i, x)
    Steps are addressed by index (the pipeline starts at index 0, `set_begin_index(0)`).
    """

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
        alphas = (F32(1.0) - _betas(cfg)).astype(F32)
        # alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4); torch accumulates the float32
        # cumulative product in float64 and rounds each entry once.
        alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(F32)
        return cls(num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)), alphas_cumprod=alphas_cumprod,
                   prediction_type=pred, timestep_spacing=spacing, steps_offset=int(cfg.get("steps_offset", 0) or 0),
                   interpolation_type=interp, use_karras_sigmas=bool(cfg.get("use_karras_sigmas", False)),
                   sigma_min=cfg.get("sigma_min"), sigma_max=cfg.get("sigma_max"), final_sigmas_type=final)

    # ----- the schedule -------------------------------------------------------------------------
    def train_sigmas(self) -> np.ndarray:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1, float32 (Karras et al. 2022, Table 1, VP)."""
        ac = self.alphas_cumprod
        return np.sqrt(((F32(1.0) - ac) / ac).astype(F32)).astype(F32)

    def spaced_timesteps(self, steps: int) -> np.ndarray:
        """The training timesteps visited, first (noisiest) to last (Lin et al. 2023, Table 2)."""
        T = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].copy()
        if self.timestep_spacing == "leading":
            ratio = T // steps
            t = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.float32)
            return t + self.steps_offset
        ratio = T / steps  # trailing
        return np.arange(T, 0, -ratio).round().copy().astype(np.float32) - 1

    def set_timesteps(self, steps: int) -> None:
        """Timesteps and sigmas for `steps` inference steps (diffusers' set_timesteps(num_inference_steps))."""
        if not 1 <= steps <= self.num_train_timesteps:
            raise UsageError(f"steps must be between 1 and {self.num_train_timesteps} (got {steps})")
        timesteps = self.spaced_timesteps(steps)
        train = self.train_sigmas()
        if self.interpolation_type == "linear":
            # sigma(t) at fractional t: piecewise linear between the training sigmas.
            sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        else:  # log_linear: sigmas evenly spaced in log sigma from sigma_min to sigma_max
            lo, hi = np.log(train[-1]), np.log(train[0])
            sigmas = np.exp(_linspace_f32(float(lo), float(hi), steps + 1)).astype(F32)
        if self.use_karras_sigmas:
            sigmas = self._karras(sigmas, steps)
            timesteps = self._sigma_to_t(sigmas, np.log(train))
        last = float(np.sqrt((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0])) if self.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(F32)
        self.timesteps = np.asarray(timesteps).astype(F32)

    def _karras(self, in_sigmas: np.ndarray, steps: int) -> np.ndarray:
        """Karras et al. 2022, eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, rho = 7."""
        smin = self.sigma_min if self.sigma_min is not None else float(in_sigmas[-1])
        smax = self.sigma_max if self.sigma_max is not None else float(in_sigmas[0])
        rho = 7.0
        ramp = np.linspace(0, 1, steps)
        return (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho

    @staticmethod
    def _sigma_to_t(sigmas: np.ndarray, log_train: np.ndarray) -> np.ndarray:
        """The fractional training timestep of each sigma: linear interpolation in log sigma."""
        log_sigma = np.log(np.maximum(sigmas, 1e-10))
        dists = log_sigma - log_train[:, np.newaxis]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_train.shape[0] - 2)
        lo, hi = log_train[low], log_train[low + 1]
        w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)

    def _ready(self) -> tuple[np.ndarray, np.ndarray]:
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

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
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

    def __len__(self) -> int:
        return 0 if self.timesteps is None else len(self.timesteps)
