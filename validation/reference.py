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

from dataclasses import dataclass, field
from typing import Any

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


def load_pipeline(source: Any) -> Any:
    pipe = source.pipeline()
    pipe.watermark = None  # no invisible watermark on the reference images
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_trajectories(pipe: Any, prompts: list[str], noise: list[np.ndarray], steps: int, guidance: float,
                     height: int, width: int, cache: tuple[int, int] | None = None) -> Trajectories:
    """Run the pipeline once per prompt (CFG with SDXL's zero negative embeddings, as the sampler),
    recording the U-Net's inputs and the latents after the last scheduler step. Prompts are encoded
    in chunks of 77 tokens by the pipeline's own encoders, as the sampler encodes them. cache:
    (interval, branch) runs them with DeepCache (validation/deepcache_reference.py)."""
    import torch

    from calibration.capture import UNetRecorder
    from calibration.prompt_embeds import pipeline_embeds

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
        for prompt, n in zip(prompts, noise):
            with torch.no_grad():
                res = pipe(**pipeline_embeds(pipe, prompt), height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                           latents=torch.from_numpy(n.copy()), output_type="np", callback_on_step_end=on_step_end,
                           callback_on_step_end_tensor_inputs=["latents"])
            out.latents.append(final.pop("latents"))
            out.images.append(np.asarray(res.images, dtype=np.float32))
    finally:
        hook.remove()
        stack.close()
    out.unet_calls = recorder.calls
    return out
