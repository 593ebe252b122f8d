"""The numpy Euler scheduler against diffusers' EulerDiscreteScheduler: same timesteps, sigmas within
float32 rounding, and every step within 1e-6 (relative to the latents' magnitude)."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from koala_core.errors import UsageError
from sampler.schedulers.euler import EulerDiscreteScheduler

SDXL = json.loads(resources.files("exporter").joinpath("configs/sdxl-scheduler.json").read_text())
CONFIGS = {
    "leading (KOALA, SDXL)": {},
    "trailing (Lightning)": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace", "steps_offset": 0},
    "leading, no offset": {"steps_offset": 0},
    "linear betas, v-prediction": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "v_prediction"},
    "karras sigmas": {"use_karras_sigmas": True},
}
STEPS = (1, 2, 3, 4, 7, 10, 25, 50)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(a).max())))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers_every_step(name: str) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler as Reference

    cfg = {**SDXL, **CONFIGS[name]}
    for steps in STEPS:
        ref, ours = Reference.from_config(cfg), EulerDiscreteScheduler.from_config(cfg)
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
        assert ours.timesteps is not None and ours.sigmas is not None
        # Spaced timesteps are exact; Karras' are found from sigmas, so they carry the sigmas' float32 rounding.
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6 if name == "karras sigmas" else 0, atol=0,
                                   err_msg=f"{name}, {steps} steps: timesteps")
        # Bound (every 1e-6 here): a few elementwise float32 operations per value, each rounded to 0.5 ULP
        # (1.19e-7 at 1) on any IEEE CPU, no reduction whose order a kernel could change; 1e-6 is 8 ULP.
        # Worst measured over every config, step count and step: 3.6e-7 (3 ULP), the same with torch
        # dispatching AVX2 (ATEN_CPU_CAPABILITY=avx2) or AVX-512 (AMD EPYC Zen 4).
        assert _rel(ref.sigmas.numpy(), ours.sigmas) <= 1e-6, (name, steps)
        assert abs(float(ref.init_noise_sigma) - float(ours.init_noise_sigma)) <= 1e-6 * float(ref.init_noise_sigma)
        rng = np.random.default_rng(steps)
        noise = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
        x_ref, x = torch.from_numpy(noise) * ref.init_noise_sigma, noise * ours.init_noise_sigma
        ref.set_begin_index(0)
        for i, t in enumerate(ref.timesteps):
            eps = rng.standard_normal(noise.shape, dtype=np.float32)
            scaled = ref.scale_model_input(x_ref, t).numpy()
            assert _rel(scaled, ours.scale_model_input(x, i)) <= 1e-6, (name, steps, i, "scale_model_input")
            x_ref = ref.step(torch.from_numpy(eps), t, x_ref, return_dict=False)[0]
            x = ours.step(eps, i, x)
            assert x.dtype == np.float32
            assert _rel(x_ref.numpy(), x) <= 1e-6, (name, steps, i, "step")


def test_lightning_settings() -> None:
    """KOALA-Lightning: 10 steps, trailing spacing, starting at t = 999 with the noise scaled by sigma_max."""
    s = EulerDiscreteScheduler.from_config({**SDXL, "timestep_spacing": "trailing"})
    s.set_timesteps(10)
    assert s.timesteps is not None and s.sigmas is not None
    assert s.timesteps.tolist() == [999.0, 899.0, 799.0, 699.0, 599.0, 499.0, 399.0, 299.0, 199.0, 99.0]
    assert s.init_noise_sigma == s.sigmas[0]  # not sqrt(sigma^2 + 1) as with leading spacing
    lead = EulerDiscreteScheduler.from_config(SDXL)
    lead.set_timesteps(25)
    assert lead.timesteps is not None and lead.timesteps[0] == 961.0 and lead.timesteps[-1] == 1.0  # steps_offset 1


def test_trailing_float_quirk_is_reproduced() -> None:
    """np.arange(1000, 0, -1000/61) has 62 entries, so diffusers runs 62 steps, the last at t = -1; so do we."""
    from diffusers import EulerDiscreteScheduler as Reference

    cfg = {**SDXL, "timestep_spacing": "trailing"}
    ref, ours = Reference.from_config(cfg), EulerDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(61)
    ours.set_timesteps(61)
    assert ours.timesteps is not None and len(ours.timesteps) == len(ref.timesteps) == 62
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


def test_rejects_what_it_cannot_do() -> None:
    with pytest.raises(UsageError, match="timestep_spacing"):
        EulerDiscreteScheduler.from_config({**SDXL, "timestep_spacing": "sideways"})
    with pytest.raises(UsageError, match="use_exponential_sigmas"):
        EulerDiscreteScheduler.from_config({**SDXL, "use_exponential_sigmas": True})
    s = EulerDiscreteScheduler.from_config(SDXL)
    with pytest.raises(UsageError, match="steps"):
        s.set_timesteps(0)
