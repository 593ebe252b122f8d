"""What the numpy schedulers share: the training noise schedule, the timestep spacings, the sigma
schedules (Karras), sigma <-> t, and the small base class every scheduler extends.

Notation. A latent-diffusion model is trained with DDPM's variance-preserving noise (Ho et al. 2020):
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps. The same process written variance-exploding
(Karras et al. 2022, "Elucidating the Design Space ...", Table 1) has sigma_t = sqrt((1 - alpha_bar_t)
/ alpha_bar_t) and x_VE = x_VP / sqrt(alpha_bar_t). The Euler-family schedulers (euler, euler_a, heun)
step in sigma; DPM-Solver++ and UniPC in lambda = log(alpha_t / sigma_t); DDIM and LCM in alpha_bar_t.

Numerics. diffusers builds its tables with torch in float32 (linspace, square, a cumulative product
accumulated in float64) and steps in float32. These helpers reproduce those roundings in numpy, so a
schedule agrees with diffusers' to float32 rounding, with no torch at run time.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from koala_core.errors import UsageError

F32 = np.float32
SPACINGS = ("linspace", "leading", "trailing")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
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


def betas(cfg: Mapping[str, Any], default_schedule: str = "linear") -> np.ndarray:
    """beta_t for t = 0..T-1 in float32 (DDPM's linear schedule, or latent diffusion's
    "scaled_linear": linear in sqrt(beta) then squared)."""
    n = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], F32)
    schedule = cfg.get("beta_schedule", default_schedule)
    b0, b1 = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    if schedule == "linear":
        return linspace_f32(b0, b1, n)
    if schedule == "scaled_linear":
        r = linspace_f32(b0 ** 0.5, b1 ** 0.5, n)
        return (r * r).astype(F32)
    if schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), beta capped at 0.999.
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], F32)
    raise UsageError(f"scheduler: beta_schedule {schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")


def alphas_cumprod(cfg: Mapping[str, Any]) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4), float32; torch accumulates the
    float32 cumulative product in float64 and rounds each entry once."""
    alphas = (F32(1.0) - betas(cfg)).astype(F32)
    return np.cumprod(alphas.astype(np.float64)).astype(F32)


def train_sigmas(ac: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1, float32 (Karras et al. 2022, Table 1, VP)."""
    return np.sqrt(((F32(1.0) - ac) / ac).astype(F32)).astype(F32)


def spaced_timesteps(spacing: str, train_steps: int, steps: int, steps_offset: int = 0) -> np.ndarray:
    """The training timesteps visited, first (noisiest) to last, float32, as the Euler-family
    schedulers space them (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Table 2): linspace, leading (+ steps_offset), trailing."""
    T = train_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = T // steps
        t = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.float32)
        return t + steps_offset
    ratio = T / steps  # trailing
    return np.arange(T, 0, -ratio).round().copy().astype(np.float32) - 1


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, rho = 7 (float64)."""
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_t(sigmas: np.ndarray, log_train: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma: linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_train[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_train.shape[0] - 2)
    lo, hi = log_train[low], log_train[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


def vp_alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """(alpha_t, sigma_t) of the VP process at VE noise level sigma: alpha_t = 1/sqrt(sigma^2 + 1),
    sigma_t = sigma * alpha_t (diffusers' _sigma_to_alpha_sigma_t), float32."""
    alpha = F32(F32(1.0) / np.sqrt(F32(sigma * sigma + F32(1.0))))
    return alpha, F32(sigma * alpha)


def vp_sigmas(ac: np.ndarray, timesteps: np.ndarray, steps: int, karras: bool, sigma_min: float | None, sigma_max: float | None,
              final_sigmas_type: str, round_karras: bool = True, karras_final: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [n + 1] float32, timesteps int64) as DPM-Solver and UniPC build them: the training sigmas
    interpolated at integer `timesteps`, or Karras' (eq. 5) between the training sigmas' ends (or the
    config's sigma_min/max) with the timesteps found from them (rounded unless not `round_karras`); then the
    final sigma, 0 or ("sigma_min") the smallest training sigma, or with `karras_final` Karras' last."""
    train = train_sigmas(ac)
    if karras:
        sigmas = karras_sigmas(float(train[0]) if sigma_min is None else sigma_min, float(train[-1]) if sigma_max is None else sigma_max, steps)
        t = sigma_to_t(sigmas, np.log(train))
        timesteps = (t.round() if round_karras else t).astype(np.int64)
        smallest = float(sigmas[-1]) if karras_final else float(train[0])
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        smallest = float(train[0])
    last = smallest if final_sigmas_type == "sigma_min" else 0.0
    return np.concatenate([sigmas, [last]]).astype(F32), timesteps


# ----- the config ---------------------------------------------------------------------------------

def config_for(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """What diffusers' `Class.from_config(cfg)` hands the class: its own __init__ arguments (`defaults`,
    diffusers' defaults for them) taken from `cfg` where present; other keys are ignored, as there."""
    return {k: (cfg[k] if k in cfg else v) for k, v in defaults.items()}


def check_config(cfg: Mapping[str, Any], who: str, *, unsupported: tuple[str, ...] = (), predictions: tuple[str, ...] = PREDICTIONS,
                 fixed: Mapping[str, Any] | None = None) -> None:
    """One line for a config field the numpy scheduler `who` cannot honour: a truthy flag in
    `unsupported`, a prediction type outside `predictions`, a spacing outside SPACINGS, or a field
    whose only supported value is given in `fixed` (absent means diffusers' default, that value)."""
    bad = [k for k in unsupported if cfg.get(k)]
    for k, v in (fixed or {}).items():
        if k in cfg and cfg[k] is not None and cfg[k] != v:
            bad.append(f"{k}={cfg[k]!r}")
    if bad:
        raise UsageError(f"scheduler {who}: {', '.join(bad)} in the model's scheduler config is not supported by the numpy scheduler")
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in predictions:
        raise UsageError(f"scheduler {who}: prediction_type {pred!r} is not supported ({', '.join(predictions)})")
    spacing = cfg.get("timestep_spacing", "linspace")
    if spacing not in SPACINGS:
        raise UsageError(f"scheduler {who}: timestep_spacing {spacing!r} is not one of {', '.join(SPACINGS)}")


# ----- the base class -----------------------------------------------------------------------------

class Scheduler:
    """What every numpy scheduler offers the loop (sampler/loop.py), addressed by step index:

        s.set_timesteps(steps)
        x = noise * s.init_noise_sigma                  # text-to-image from index 0, or
        i0 = s.begin_index(steps, strength); x = s.add_noise(image_latents, noise, i0)   # img2img
        for i in range(i0, len(s.timesteps)):
            eps = unet(s.scale_model_input(x, i), s.timesteps[i])
            x = s.step(eps, i, x, noise=step_noise() if s.stochastic else None)

    `order` is diffusers' (2 for Heun, whose timesteps are doubled: its img2img start is 2 x t_start).
    `stochastic` schedulers (euler_a, lcm) add fresh noise in step(): the caller passes it (the
    numpy noise source sampler/schedulers/noise.py), so runs are reproducible and comparable with
    diffusers fed the same tensors.
    """

    name = ""
    order = 1
    stochastic = False
    # set by each scheduler (annotations only: a dataclass subclass would take values here as its defaults)
    num_train_timesteps: int
    timestep_spacing: str
    timesteps: np.ndarray | None

    def set_timesteps(self, steps: int) -> None:  # pragma: no cover - every scheduler defines it
        raise NotImplementedError

    def _check_steps(self, steps: int) -> None:
        if not 1 <= steps <= self.num_train_timesteps:
            raise UsageError(f"steps must be between 1 and {self.num_train_timesteps} (got {steps})")

    def _ready(self) -> np.ndarray:
        if getattr(self, "timesteps", None) is None:
            raise RuntimeError("call set_timesteps(steps) first")
        return self.timesteps

    @property
    def init_noise_sigma(self) -> np.float32:
        """Standard deviation of the initial latents (1 for the VP-parameterized schedulers)."""
        return F32(1.0)

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        """The U-Net input for step `index` (unchanged unless the scheduler steps in VE coordinates)."""
        return sample

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def add_noise(self, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:  # pragma: no cover
        """`original` latents noised to the level of step `index` (img2img's start)."""
        raise NotImplementedError

    def begin_index(self, steps: int, strength: float) -> int:
        """The index img2img starts at: diffusers' StableDiffusionXLImg2ImgPipeline.get_timesteps,
        t_start = steps - min(int(steps * strength), steps), times `order` (its set_begin_index)."""
        init = min(int(steps * strength), steps)
        return max(steps - init, 0) * self.order

    def _noise(self, noise: np.ndarray | None, like: np.ndarray) -> np.ndarray:
        if noise is None:
            raise ValueError(f"scheduler {self.name} draws noise at each step: pass step(..., noise=...) (sampler/schedulers/noise.py)")
        if noise.shape != like.shape:
            raise ValueError(f"scheduler {self.name}: step noise of shape {noise.shape}, expected {like.shape}")
        return noise.astype(F32, copy=False)

    def __len__(self) -> int:
        t = getattr(self, "timesteps", None)
        return 0 if t is None else len(t)


class VPSolver(Scheduler):
    """What the VP-parameterized multistep solvers (dpmpp_2m, unipc) share: they keep VE `sigmas` [n + 1]
    and work on the VP alpha_t, sigma_t of each (vp_alpha_sigma), predicting data x0."""

    prediction_type: str
    sigmas: np.ndarray | None

    @staticmethod
    def check_solver(c: Mapping[str, Any], who: str) -> None:
        """One line for a solver order or final sigma type the numpy solvers do not have."""
        if int(c["solver_order"]) not in (1, 2):
            raise UsageError(f"scheduler {who}: solver_order={c['solver_order']} is not supported by the numpy scheduler (1 or 2)")
        if (c["final_sigmas_type"] or "zero") not in ("zero", "sigma_min"):
            raise UsageError(f"scheduler {who}: final_sigmas_type={c['final_sigmas_type']!r} is not one of zero, sigma_min")

    def add_noise(self, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:
        """alpha_t x0 + sigma_t noise at step `index` (the VP forward process, Ho et al. 2020, eq. 4)."""
        self._ready()
        assert self.sigmas is not None
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[index])
        return (alpha_t * original + sigma_t * noise).astype(F32, copy=False)

    def _x0(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        """The data prediction x0 the solvers integrate (diffusers' convert_model_output)."""
        alpha_t, sigma_t = vp_alpha_sigma(sigma)
        if self.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        if self.prediction_type == "v_prediction":
            return alpha_t * sample - sigma_t * model_output
        return model_output
