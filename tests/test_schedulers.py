"""Every numpy scheduler against the diffusers class its name maps to (sampler.schedulers.DIFFUSERS),
built from_config of the same model config: same timesteps, same initial-noise scale, and every
scale_model_input and step within float32 rounding on the same model outputs. The stochastic ones
(euler_a, lcm) get diffusers' randn_tensor replaced by the numpy step-noise source, so diffusers adds
the identical tensors."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import numpy as np
import pytest

from koala_core.errors import UsageError
from sampler.schedulers import DIFFUSERS, SCHEDULERS, make_scheduler, scheduler_config
from sampler.schedulers.noise import StepNoise

SDXL = json.loads(resources.files("exporter").joinpath("configs/sdxl-scheduler.json").read_text())
CONFIGS: dict[str, dict[str, Any]] = {
    "leading (KOALA, SDXL)": {},
    "trailing (Lightning)": {"timestep_spacing": "trailing"},
    "linspace, v-prediction": {"timestep_spacing": "linspace", "steps_offset": 0, "prediction_type": "v_prediction"},
}
STEPS = (1, 2, 4, 7, 15, 25)
SHAPE = (2, 4, 8, 8)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(a).max())))


def reference(name: str, cfg: dict[str, Any]) -> Any:
    """The diffusers scheduler `name` stands for, from_config of `cfg` with the name's overrides."""
    import diffusers

    cls, overrides = DIFFUSERS[name]
    return getattr(diffusers, cls).from_config(cfg, **overrides)


class FeedNoise:
    """diffusers' randn_tensor replaced: each call returns the next tensor of a StepNoise stream."""

    def __init__(self, noise: StepNoise) -> None:
        self.noise = noise

    def __call__(self, shape: Any, **kwargs: Any) -> Any:
        import torch

        out = torch.from_numpy(self.noise())
        assert tuple(out.shape) == tuple(shape), (out.shape, shape)
        return out


def feed_noise(monkeypatch: pytest.MonkeyPatch, seed: int, batch: int, shape: tuple[int, ...]) -> None:
    """Make diffusers' stochastic schedulers draw the numpy step noise of (seed, batch)."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea

    feed = FeedNoise(StepNoise(seed, batch, shape))
    monkeypatch.setattr(ea, "randn_tensor", feed)
    try:
        import diffusers.schedulers.scheduling_lcm as lcm

        monkeypatch.setattr(lcm, "randn_tensor", feed)
    except ImportError:  # pragma: no cover
        pass


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_step_matches_diffusers(name: str, config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    cfg = {**SDXL, **CONFIGS[config]}
    worst = 0.0
    for steps in STEPS:
        if name == "lcm" and steps > 50:
            continue
        ref, ours = reference(name, cfg), make_scheduler(name, cfg)
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
        assert ours.timesteps is not None
        # Timesteps: the same integers (or float32 values for the Euler family).
        np.testing.assert_allclose(ours.timesteps.astype(np.float64), ref.timesteps.numpy().astype(np.float64), rtol=1e-6, atol=0,
                                   err_msg=f"{name}, {config}, {steps} steps: timesteps")
        assert ours.order == ref.order
        init = float(ref.init_noise_sigma)
        assert abs(float(ours.init_noise_sigma) - init) <= 1e-6 * init, (name, config, steps)
        rng = np.random.default_rng(steps)
        noise = rng.standard_normal(SHAPE, dtype=np.float32)
        x_ref, x = torch.from_numpy(noise) * ref.init_noise_sigma, (noise * ours.init_noise_sigma).astype(np.float32)
        if hasattr(ref, "set_begin_index"):  # DDIM finds its step by timestep
            ref.set_begin_index(0)
        step_noise = StepNoise(steps, SHAPE[0], SHAPE[1:])
        feed_noise(monkeypatch, steps, SHAPE[0], SHAPE[1:])
        for i, t in enumerate(ref.timesteps):
            eps = rng.standard_normal(SHAPE, dtype=np.float32)
            scaled = ref.scale_model_input(x_ref, t).numpy()
            assert _rel(scaled, ours.scale_model_input(x, i)) <= 1e-5, (name, config, steps, i, "scale_model_input")
            x_ref = ref.step(torch.from_numpy(eps), t, x_ref, return_dict=False)[0]
            x = ours.step(eps, i, x, noise=step_noise() if ours.stochastic else None)
            assert x.dtype == np.float32
            err = _rel(x_ref.numpy(), x)
            worst = max(worst, err)
            # Bound: a few float32 operations per element and per scalar, each within 0.5 ULP, no reduction
            # whose order could change; 1e-5 (~80 ULP at 1) leaves room for the multistep solvers' scalar
            # chains (log, exp, a 2x2 solve) being rounded in another order than torch's.
            assert err <= 1e-5, (name, config, steps, i, "step", err)
    print(f"{name}, {config}: worst step error {worst:.2e}")
