"""The PyTorch reference: diffusers' StableDiffusionXLPipeline over the model's components
(`exporter.sources.ModelSource.pipeline()`), used three ways with one copy of the weights:

- per component, through the same spec-shaped wrappers the export traced (`PipelineBackend`);
- its denoising trajectories for the prompts (U-Net inputs at every step, recorded by
  calibration.capture.UNetRecorder, and the final latents): the "prompts" inputs of the U-Net and
  the VAE decoder;
- end to end: its final latents (after the last scheduler step) and decoded images.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

from exporter.specs import ComponentSpec
from runtime.backend import Backend


class PipelineBackend(Backend):
    """The pipeline's modules as a runtime Backend (numpy in, float32 numpy out, spec names)."""

    name = "pytorch"

    def __init__(self, pipe: Any, specs: dict[str, ComponentSpec]) -> None:
        self.pipe, self.specs = pipe, specs
        self._wrapped: dict[str, Any] = {}

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from exporter.check import torch_outputs
        from exporter.wrappers import wrap

        spec = self.specs[component]
        if component not in self._wrapped:
            self._wrapped[component] = wrap(spec, getattr(self.pipe, spec.module))
        # The reference computes in FP32 whatever dtype the candidate's I/O is.
        feeds = {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in feeds.items()}
        return torch_outputs(spec, self._wrapped[component], feeds)

    def release(self, component: str) -> None:
        """Drop a module once its checks are done: at 1024 px a full-size model's other weights
        would otherwise sit beside the VAE decoder's activations in PyTorch and ONNX Runtime."""
        import gc

        self._wrapped.pop(component, None)
        setattr(self.pipe, self.specs[component].module, None)
        gc.collect()

    def close(self) -> None:
        self._wrapped.clear()


@dataclass
class Trajectories:
    """The reference pipeline's runs, one per prompt, from the same initial noise the candidate gets."""

    prompts: list[str]
    noise: list[np.ndarray]  # [1, C, h, w] float32 each, as diffusers' `latents=` takes it
    unet_calls: list[dict[str, np.ndarray]] = field(default_factory=list)  # every U-Net call, all prompts
    latents: list[np.ndarray] = field(default_factory=list)  # final latents (output_type="latent")
    images: list[np.ndarray] = field(default_factory=list)  # [1, H, W, 3] in [0, 1]


def diffusers_scheduler(name: str | None, config: Mapping[str, Any]) -> Any:
    """The diffusers scheduler the numpy scheduler `name` stands for (sampler.schedulers.DIFFUSERS),
    built from_config of the model's scheduler config with the name's overrides."""
    import diffusers

    from sampler.schedulers import DIFFUSERS, check_name

    cls, overrides = DIFFUSERS[check_name(name)]
    return getattr(diffusers, cls).from_config(dict(config), **overrides)


@contextmanager
def step_noise(seed: int, batch: int, shape: tuple[int, ...]) -> Iterator[None]:
    """While active, diffusers' stochastic schedulers (EulerAncestralDiscreteScheduler, LCMScheduler), which
    draw their step noise with randn_tensor inside step(), get the numpy stream the sampler's euler_a/lcm
    add instead (sampler.schedulers.noise.StepNoise(seed, batch, shape)): both run on identical tensors."""
    import torch
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a
    import diffusers.schedulers.scheduling_lcm as lcm

    from sampler.schedulers.noise import StepNoise

    noise = StepNoise(seed, batch, shape)

    def randn_tensor(shape_: Any, **kwargs: Any) -> Any:
        out = torch.from_numpy(noise())
        if tuple(out.shape) != tuple(shape_):
            raise ValueError(f"step noise of shape {tuple(out.shape)} asked for {tuple(shape_)}")
        return out

    saved = [(m, m.randn_tensor) for m in (euler_a, lcm)]
    try:
        for m, _ in saved:
            m.randn_tensor = randn_tensor  # type: ignore[attr-defined]
        yield
    finally:
        for m, f in saved:
            m.randn_tensor = f  # type: ignore[attr-defined]


@contextmanager
def image_noise(pipe: Any, noise: np.ndarray) -> Iterator[None]:
    """While active, diffusers' img2img / inpainting pipeline `pipe` takes the VAE posterior's mean
    (retrieve_latents(..., sample_mode="argmax")) and `noise` where it draws its noise, as the sampler
    does (sampler/img2img.py): both run on identical tensors."""
    import sys

    import torch

    mod = sys.modules[type(pipe).__module__]
    saved = mod.randn_tensor, mod.retrieve_latents

    def randn(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, layout: Any = None) -> Any:
        if tuple(shape) != noise.shape:
            raise ValueError(f"the pipeline draws noise of shape {tuple(shape)}, the candidate's is {noise.shape}")
        return torch.from_numpy(noise.copy()).to(dtype or torch.float32)

    def mean(encoder_output: Any, generator: Any = None, sample_mode: str = "sample") -> Any:
        return saved[1](encoder_output, generator, sample_mode="argmax")

    mod.randn_tensor, mod.retrieve_latents = randn, mean
    try:
        yield
    finally:
        mod.randn_tensor, mod.retrieve_latents = saved


def load_pipeline(source: Any, task: str = "text2img") -> Any:
    """The reference pipeline: text2img, img2img or inpaint (exporter.sources.ModelSource.pipeline)."""
    pipe = source.pipeline(task)
    pipe.watermark = None  # no invisible watermark on the reference images
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_trajectories(pipe: Any, prompts: list[str], noise: list[np.ndarray], steps: int, guidance: float,
                     height: int, width: int, scheduler: str | None = None,
                     image_inputs: Mapping[str, Any] | None = None, cache: tuple[int, int] | None = None) -> Trajectories:
    """Run the pipeline once per prompt (CFG with SDXL's zero negative embeddings, as the sampler),
    recording the U-Net's inputs and the latents after the last scheduler step. Prompts are encoded
    in chunks of 77 tokens by the pipeline's own encoders, as the sampler encodes them. `scheduler`
    (a sampler.schedulers name; None: the model's own) is the diffusers scheduler of that name; the
    stochastic ones get prompt i's step noise of seed i (the candidate's, end_to_end.candidate_run).
    `image_inputs` (image, mask_image, strength; `pipe` an img2img or inpainting pipeline): the noise
    is added to the image's latents (image_noise) instead of being the initial latents. cache:
    (interval, branch) runs them with DeepCache (validation/deepcache_reference.py)."""
    import torch

    from calibration.capture import UNetRecorder
    from calibration.prompt_embeds import pipeline_embeds

    if scheduler is not None:
        pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    out = Trajectories(list(prompts), list(noise))
    recorder = UNetRecorder()
    hook = pipe.unet.register_forward_pre_hook(recorder, with_kwargs=True)
    final: dict[str, np.ndarray] = {}

    def on_step_end(p: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        final["latents"] = kwargs["latents"].detach().float().numpy().copy()
        return kwargs

    stack = contextlib.ExitStack()
    if cache is not None:
        from validation.deepcache_reference import deepcache

        stack.enter_context(deepcache(pipe, *cache))
    try:
        for i, (prompt, n) in enumerate(zip(prompts, noise)):
            if image_inputs:  # img2img takes its size from the image; inpainting is given it
                start = {k: v for k, v in image_inputs.items() if v is not None}
                start.update({"height": height, "width": width} if image_inputs.get("mask_image") is not None else {})
                noising = image_noise(pipe, n)
            else:
                start, noising = {"height": height, "width": width, "latents": torch.from_numpy(n.copy())}, nullcontext()
            with torch.no_grad(), step_noise(i, n.shape[0], n.shape[1:]), noising:
                res = pipe(**pipeline_embeds(pipe, prompt), **start, num_inference_steps=steps, guidance_scale=guidance,
                           output_type="np", callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
            out.latents.append(final.pop("latents"))
            out.images.append(np.asarray(res.images, dtype=np.float32))
    finally:
        hook.remove()
        stack.close()
    out.unet_calls = recorder.calls
    return out
