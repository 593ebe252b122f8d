"""DPM-Solver++(2M) in numpy, step for step what diffusers' DPMSolverMultistepScheduler does with
algorithm_type "dpmsolver++" and solver_order 2 (`dpmpp_2m`; `dpmpp_2m_karras` adds use_karras_sigmas).

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models":
the data-prediction ODE solved exactly in its linear part over lambda = log(alpha_t / sigma_t), h =
lambda_t - lambda_s. First order (eq. 8 with k = 1, DDIM):
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0(x_s)
and the multistep second order (Algorithm 2, "midpoint"; "heun" is their eq. 11 variant), reusing the
previous step's x0, with r = h_prev / h, D1 = (x0_s - x0_prev) / r:
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) (x0_s + D1 / 2).
The first step (no history) and, as diffusers decides, the last (lower_order_final with fewer than 15
steps, euler_at_final, or a final sigma of 0) are first order. Sigmas are VE sigmas (common.py), the VP
alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t; the initial noise is not scaled (sigma 1 in VP).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from koala_core.errors import UsageError
from sampler.schedulers.common import F32, VPSolver, alphas_cumprod, check_config, config_for, vp_alpha_sigma, vp_sigmas

# diffusers' DPMSolverMultistepScheduler.__init__ arguments and defaults
DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None, solver_order=2,
    prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type="dpmsolver++",
    solver_type="midpoint", lower_order_final=True, euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
    lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
    use_dynamic_shifting=False, time_shift_type="exponential")


def dpm_timesteps(spacing: str, train_steps: int, last: int, steps: int, steps_offset: int) -> np.ndarray:
    """The integer timesteps DPM-Solver and UniPC visit (their spacing spaces steps + 1 points and drops
    the last; `last` is the first timestep past the clipped lambda range, T when nothing is clipped)."""
    if spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    ratio = train_steps / steps  # trailing
    return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1


class DPMSolverMultistepScheduler(VPSolver):
    """DPM-Solver++ multistep, first or second order, deterministic."""

    name = "dpmpp_2m"

    def __init__(self, c: Mapping[str, Any], sigma_min: float | None = None, sigma_max: float | None = None) -> None:
        self.num_train_timesteps = int(c["num_train_timesteps"])
        self.alphas_cumprod = alphas_cumprod(c)
        self.prediction_type: str = c["prediction_type"]
        self.timestep_spacing: str = c["timestep_spacing"]
        self.steps_offset = int(c["steps_offset"] or 0)
        self.solver_order = int(c["solver_order"])
        self.solver_type: str = c["solver_type"]
        self.lower_order_final = bool(c["lower_order_final"])
        self.euler_at_final = bool(c["euler_at_final"])
        self.use_karras_sigmas = bool(c["use_karras_sigmas"])
        self.final_sigmas_type: str = c["final_sigmas_type"] or "zero"
        self.lambda_min_clipped = float(c["lambda_min_clipped"])
        self.beta_schedule: str = c["beta_schedule"]
        self.sigma_min, self.sigma_max = sigma_min, sigma_max  # Karras' ends, when the config has them
        self.timesteps: np.ndarray | None = None
        self.sigmas: np.ndarray | None = None
        self._outputs: list[np.ndarray] = []
        self._lower_order_nums = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "DPMSolverMultistepScheduler":
        """From a diffusers scheduler config, as DPMSolverMultistepScheduler.from_config reads it."""
        c = config_for(cfg, DEFAULTS)
        check_config(c, cls.name, unsupported=("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                                               "variance_type", "rescale_betas_zero_snr", "use_dynamic_shifting"),
                     fixed={"algorithm_type": "dpmsolver++"})
        cls.check_solver(c, cls.name)
        if c["solver_type"] not in ("midpoint", "heun"):
            raise UsageError(f"scheduler {cls.name}: solver_type={c['solver_type']!r} is not supported by the numpy scheduler (midpoint, heun)")
        # diffusers keeps a config's sigma_min/sigma_max although they are no __init__ arguments, and Karras uses them
        return cls(c, cfg.get("sigma_min"), cfg.get("sigma_max"))

    # ----- the schedule -------------------------------------------------------------------------
    def set_timesteps(self, steps: int) -> None:
        """Integer timesteps spaced over the (lambda-clipped) training range; sigmas interpolated at them,
        or Karras' (eq. 5) between the training sigmas' ends with timesteps found from them and rounded."""
        self._check_steps(steps)
        ac = self.alphas_cumprod
        with np.errstate(divide="ignore"):
            lambda_t = (np.log(np.sqrt(ac)) - np.log(np.sqrt((F32(1.0) - ac).astype(F32)))).astype(F32)
        clipped = int(np.searchsorted(lambda_t[::-1], self.lambda_min_clipped))  # torch.searchsorted on the flipped lambdas
        timesteps = dpm_timesteps(self.timestep_spacing, self.num_train_timesteps, self.num_train_timesteps - clipped, steps, self.steps_offset)
        self.sigmas, self.timesteps = vp_sigmas(ac, timesteps, steps, self.use_karras_sigmas, self.sigma_min, self.sigma_max,
                                                self.final_sigmas_type, round_karras=self.beta_schedule != "squaredcos_cap_v2")
        self._outputs, self._lower_order_nums = [], 0

    # ----- one step -----------------------------------------------------------------------------
    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        timesteps = self._ready()
        assert self.sigmas is not None
        n = len(timesteps)
        lower_final = index == n - 1 and (self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero")
        x0 = self._x0(model_output, sample, self.sigmas[index])
        self._outputs = [*self._outputs, x0][-self.solver_order:]
        sample = sample.astype(F32, copy=False)
        s = self.sigmas
        alpha_t, sigma_t = vp_alpha_sigma(s[index + 1])
        alpha_s0, sigma_s0 = vp_alpha_sigma(s[index])
        with np.errstate(divide="ignore"):  # sigma_t = 0 at the end: lambda_t = inf, e^-h = 0
            lambda_t = F32(np.log(alpha_t) - np.log(sigma_t))
            lambda_s0 = F32(np.log(alpha_s0) - np.log(sigma_s0))
        h = F32(lambda_t - lambda_s0)
        em1 = F32(alpha_t * F32(np.exp(-h) - F32(1.0)))  # alpha_t (e^-h - 1)
        with np.errstate(invalid="ignore"):
            ratio = F32(sigma_t / sigma_s0)
        if self.solver_order == 1 or self._lower_order_nums < 1 or lower_final:
            prev = ratio * sample - em1 * x0  # eq. 8, k = 1
        else:
            alpha_s1, sigma_s1 = vp_alpha_sigma(s[index - 1])
            lambda_s1 = F32(np.log(alpha_s1) - np.log(sigma_s1))
            r0 = F32(F32(lambda_s0 - lambda_s1) / h)
            m0, m1 = self._outputs[-1], self._outputs[-2]
            d1 = F32(F32(1.0) / r0) * (m0 - m1)
            if self.solver_type == "midpoint":  # Algorithm 2
                prev = ratio * sample - em1 * m0 - F32(F32(0.5) * em1) * d1
            else:  # "heun": x_t = ... + alpha_t ((e^-h - 1) / h + 1) D1
                prev = ratio * sample - em1 * m0 + F32(alpha_t * F32(F32(F32(np.exp(-h) - F32(1.0)) / h) + F32(1.0))) * d1
        if self._lower_order_nums < self.solver_order:
            self._lower_order_nums += 1
        return prev.astype(model_output.dtype, copy=False)


class DPMSolverMultistepKarras(DPMSolverMultistepScheduler):
    """dpmpp_2m_karras: the same with use_karras_sigmas=True (make_scheduler sets it in the config)."""

    name = "dpmpp_2m_karras"
