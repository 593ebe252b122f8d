"""The schedulers of the numpy sampler, one file per scheduler as diffusers has one per class, under
the names the community uses (A1111, ComfyUI). Each is built from the model's own scheduler config
the way diffusers' `<Class>.from_config(config, **overrides)` builds it (DIFFUSERS says which class
and overrides), so the reference (validation/reference.py, the tests) builds the same one.

    sched = make_scheduler("dpmpp_2m_karras", assets.scheduler_config)
    sched.set_timesteps(15)

The interface every scheduler offers is common.Scheduler's.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from koala_core.errors import UsageError
from sampler.schedulers.common import Scheduler

# name -> (diffusers class, the config overrides its from_config is called with)
DIFFUSERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
SCHEDULERS: tuple[str, ...] = tuple(DIFFUSERS)
DEFAULT = "euler"  # the model's own config (KOALA's, SDXL's and Lightning's are EulerDiscreteScheduler)


def _builders() -> dict[str, Callable[[Mapping[str, Any]], Scheduler]]:
    from sampler.schedulers.ddim import DDIMScheduler
    from sampler.schedulers.dpmpp_2m import DPMSolverMultistepKarras, DPMSolverMultistepScheduler
    from sampler.schedulers.euler import EulerDiscreteScheduler
    from sampler.schedulers.euler_a import EulerAncestralDiscreteScheduler
    from sampler.schedulers.heun import HeunDiscreteScheduler
    from sampler.schedulers.lcm import LCMScheduler
    from sampler.schedulers.unipc import UniPCMultistepScheduler

    return {"euler": EulerDiscreteScheduler.from_config, "euler_a": EulerAncestralDiscreteScheduler.from_config,
            "heun": HeunDiscreteScheduler.from_config, "dpmpp_2m": DPMSolverMultistepScheduler.from_config,
            "dpmpp_2m_karras": DPMSolverMultistepKarras.from_config, "ddim": DDIMScheduler.from_config,
            "unipc": UniPCMultistepScheduler.from_config, "lcm": LCMScheduler.from_config}


def check_name(name: str | None) -> str:
    """The scheduler's name (None: the default); UsageError in one line listing the known ones."""
    name = DEFAULT if name is None else name
    if name not in DIFFUSERS:
        raise UsageError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    return name


def scheduler_config(name: str | None, config: Mapping[str, Any]) -> dict[str, Any]:
    """The model's scheduler config with the overrides scheduler `name` is built with."""
    return {**config, **DIFFUSERS[check_name(name)][1]}


def make_scheduler(name: str | None, config: Mapping[str, Any]) -> Scheduler:
    """A fresh scheduler `name` (None or "euler": the model's own, as its config says) from the model's
    scheduler config; UsageError for an unknown name or a config field it cannot honour."""
    name = check_name(name)
    return _builders()[name](scheduler_config(name, config))
