"""UniPC in numpy, step for step what diffusers' UniPCMultistepScheduler does (B(h) = e^h - 1, "bh2";
data prediction; order 2; the corrector on every step but the first).

Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models": in lambda = log(alpha_t / sigma_t), with hh = -h (data prediction) and h phi_1 = e^hh - 1,
  predictor UniP-p (Algorithm 2 / eq. 8):  x_t = (sigma_t / sigma_s) x_s - alpha_t h phi_1 m0
                                               - alpha_t B(h) sum_k rho_k^p D_k / r_k,
  corrector UniC-p (Algorithm 1 / eq. 7):  the same from the previous sample with the new model
                                               output m_t: ... - alpha_t B(h) (sum_k rho_k^c D_k + rho_t^c (m_t - m0)),
where the rho solve R rho = b with R_ij = r_j^(i-1) and b_i = i! h phi_{i+1}(h) / B(h) (eq. 9-10);
for one history point rho^p = 1/2, and the first-order corrector uses rho^c = 1/2. Sigmas and timesteps
as DPM-Solver's (dpmpp_2m.py); the initial noise is not scaled.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sampler.schedulers.common import F32, VPSolver, alphas_cumprod, check_config, config_for, vp_alpha_sigma, vp_sigmas
from sampler.schedulers.dpmpp_2m import dpm_timesteps

# diffusers' UniPCMultistepScheduler.__init__ arguments and defaults
DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None, solver_order=2,
    prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0, predict_x0=True,
    solver_type="bh2", lower_order_final=True, disable_corrector=[], solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0, timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
    rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential", sigma_min=None, sigma_max=None,
    shift_terminal=None)


def _lam(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
    """(alpha_t, sigma_t, lambda_t) at VE sigma; lambda = log alpha_t - log sigma_t (inf at sigma 0)."""
    a, s = vp_alpha_sigma(sigma)
    with np.errstate(divide="ignore"):
        return a, s, F32(np.log(a) - np.log(s))


class UniPCMultistepScheduler(VPSolver):
    """UniPC with the bh1/bh2 B(h), data prediction, order 1 or 2."""

    name = "unipc"

    def __init__(self, c: Mapping[str, Any]) -> None:
        self.num_train_timesteps = int(c["num_train_timesteps"])
        self.alphas_cumprod = alphas_cumprod(c)
        self.prediction_type: str = c["prediction_type"]
        self.timestep_spacing: str = c["timestep_spacing"]
        self.steps_offset = int(c["steps_offset"] or 0)
        self.solver_order = int(c["solver_order"])
        self.solver_type: str = c["solver_type"] if c["solver_type"] in ("bh1", "bh2") else "bh2"  # diffusers maps the others to bh2
        self.lower_order_final = bool(c["lower_order_final"])
        self.disable_corrector = set(c["disable_corrector"] or [])
        self.use_karras_sigmas = bool(c["use_karras_sigmas"])
        self.final_sigmas_type: str = c["final_sigmas_type"] or "zero"
        self.sigma_min, self.sigma_max = c["sigma_min"], c["sigma_max"]
        self.timesteps: np.ndarray | None = None
        self.sigmas: np.ndarray | None = None
        self._reset()

    def _reset(self) -> None:
        self._outputs: list[np.ndarray] = []
        self._lower_order_nums = 0
        self._last_sample: np.ndarray | None = None
        self._this_order = 1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "UniPCMultistepScheduler":
        """From a diffusers scheduler config, as UniPCMultistepScheduler.from_config reads it."""
        c = config_for(cfg, DEFAULTS)
        check_config(c, cls.name, unsupported=("thresholding", "solver_p", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas",
                                               "rescale_betas_zero_snr", "use_dynamic_shifting", "shift_terminal"),
                     fixed={"predict_x0": True})
        cls.check_solver(c, cls.name)
        return cls(c)

    # ----- the schedule -------------------------------------------------------------------------
    def set_timesteps(self, steps: int) -> None:
        self._check_steps(steps)
        T = self.num_train_timesteps
        timesteps = dpm_timesteps(self.timestep_spacing, T, T, steps, self.steps_offset)
        self.sigmas, self.timesteps = vp_sigmas(self.alphas_cumprod, timesteps, steps, self.use_karras_sigmas, self.sigma_min,
                                                self.sigma_max, self.final_sigmas_type, karras_final=True)
        self._reset()

    # ----- one step -----------------------------------------------------------------------------

    def _coefficients(self, h: np.float32, rks: list[np.float32], order: int) -> tuple[np.float32, np.float32, np.ndarray, np.ndarray]:
        """hh = -h, h phi_1 = expm1(hh), B(h), and the R, b of eq. 9-10 (float32, as diffusers builds them)."""
        hh = F32(-h)
        h_phi_1 = F32(np.expm1(hh))
        h_phi_k = F32(F32(h_phi_1 / hh) - F32(1.0))
        b_h = hh if self.solver_type == "bh1" else F32(np.expm1(hh))
        r = np.array([*rks, F32(1.0)], F32)
        R, b, fact = [], [], 1
        for i in range(1, order + 1):
            R.append(np.power(r, F32(i - 1)).astype(F32))
            b.append(F32(F32(h_phi_k * F32(fact)) / b_h))
            fact *= i + 1
            h_phi_k = F32(F32(h_phi_k / hh) - F32(1.0 / fact))
        return h_phi_1, b_h, np.stack(R), np.array(b, F32)

    def _update(self, x: np.ndarray, m0: np.ndarray, i_t: int, i_s0: int, i_s1: int | None, order: int,
                model_t: np.ndarray | None) -> np.ndarray:
        """Predictor (model_t None) from sigma[i_s0] to sigma[i_t], or corrector with the new output model_t;
        i_s1 is the history point's sigma index for order 2."""
        assert self.sigmas is not None
        alpha_t, sigma_t, lam_t = _lam(self.sigmas[i_t])
        _, sigma_s0, lam_s0 = _lam(self.sigmas[i_s0])
        h = F32(lam_t - lam_s0)
        rks: list[np.float32] = []
        d1 = None
        if order == 2:
            assert i_s1 is not None
            rk = F32(F32(_lam(self.sigmas[i_s1])[2] - lam_s0) / h)
            rks.append(rk)
            d1 = (self._outputs[-2] - m0) / rk
        h_phi_1, b_h, R, b = self._coefficients(h, rks, order)
        with np.errstate(invalid="ignore"):
            x_t_ = F32(sigma_t / sigma_s0) * x - F32(alpha_t * h_phi_1) * m0
        ab = F32(alpha_t * b_h)
        if model_t is None:  # predictor: rho^p = 1/2 for one history point
            res = F32(0.5) * d1 if d1 is not None else None
            return x_t_ if res is None else x_t_ - ab * res
        rhos_c = np.array([F32(0.5)], F32) if order == 1 else np.linalg.solve(R, b).astype(F32)
        corr = model_t - m0
        inner = rhos_c[-1] * corr
        if d1 is not None:
            inner = rhos_c[0] * d1 + inner
        return x_t_ - ab * inner

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Correct the sample with this output (UniC), then predict the next one (UniP)."""
        timesteps = self._ready()
        assert self.sigmas is not None
        sample = sample.astype(F32, copy=False)
        x0 = self._x0(model_output, sample, self.sigmas[index])
        if index > 0 and (index - 1) not in self.disable_corrector and self._last_sample is not None:
            order = self._this_order
            sample = self._update(self._last_sample, self._outputs[-1], index, index - 1, index - 2 if order == 2 else None, order, x0)
        self._outputs = [*self._outputs, x0][-self.solver_order:]
        order = min(self.solver_order, len(timesteps) - index) if self.lower_order_final else self.solver_order
        self._this_order = min(order, self._lower_order_nums + 1)  # warm-up of the multistep
        self._last_sample = sample
        prev = self._update(sample, x0, index + 1, index, index - 1 if self._this_order == 2 else None, self._this_order, None)
        if self._lower_order_nums < self.solver_order:
            self._lower_order_nums += 1
        return prev.astype(model_output.dtype, copy=False)
