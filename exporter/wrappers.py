"""PyTorch modules whose forward takes exactly a component spec's inputs and returns its outputs.

These are what gets exported and what the exported graphs are compared against.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from exporter.specs import ComponentSpec


class TextEncoderWrapper(torch.nn.Module):
    """SDXL's use of a CLIP text encoder: penultimate hidden states (+ projected pooled output)."""

    def __init__(self, encoder: torch.nn.Module, with_projection: bool) -> None:
        super().__init__()
        self.encoder, self.with_projection = encoder, with_projection

    def forward(self, input_ids: torch.Tensor) -> Any:
        out = self.encoder(input_ids.to(torch.int64), output_hidden_states=True)
        hidden = out.hidden_states[-2]
        return (hidden, out.text_embeds) if self.with_projection else hidden


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]


def _named_forward(cls: type, names: list[str]) -> type:
    """A subclass of `cls` whose forward takes `names` by name (the spec's inputs), so torch.export binds
    the per-input dynamic shapes to them; cls.forward takes them as *inputs."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]

    def forward(self: Any, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        bound = sig.bind(self, *args, **kwargs)
        return cls.forward(self, *(bound.arguments[n] for n in names))

    sig = inspect.Signature(params)
    forward.__signature__ = sig  # type: ignore[attr-defined]
    return type(cls.__name__, (cls,), {"forward": forward})


class UNetControlNetWrapper(torch.nn.Module):
    """The U-Net with a ControlNet's residuals as inputs (`unet_controlnet`): the down residuals, then
    the mid residual, added as diffusers' UNet2DConditionModel adds them (the mid one even without a
    mid block)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor, *residuals: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                         down_block_additional_residuals=list(residuals[:-1]), mid_block_additional_residual=residuals[-1],
                         return_dict=False)[0]


class ControlNetWrapper(torch.nn.Module):
    """diffusers' ControlNetModel as StableDiffusionXLControlNetPipeline calls it (guess_mode off):
    the down residuals and the mid residual, each times conditioning_scale."""

    def __init__(self, controlnet: torch.nn.Module) -> None:
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, text_embeds: torch.Tensor,
                time_ids: torch.Tensor, controlnet_cond: torch.Tensor, conditioning_scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
                                    conditioning_scale=1.0, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                                    guess_mode=False, return_dict=False)
        # diffusers multiplies each residual by the scale inside; here the scale is a graph input.
        scale = conditioning_scale.reshape(())
        return (*(d * scale for d in down), mid * scale)


class VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderWrapper(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample, return_dict=False)[0].parameters


def wrap(spec: ComponentSpec, module: torch.nn.Module) -> torch.nn.Module:
    """The export wrapper for `spec` around the pipeline module it names."""
    if spec.kind == "text_encoder":
        return TextEncoderWrapper(module, with_projection=len(spec.outputs) > 1).eval()
    if spec.name == "unet_controlnet":
        return _named_forward(UNetControlNetWrapper, [t.name for t in spec.inputs])(module).eval()
    if spec.kind == "controlnet":
        return ControlNetWrapper(module).eval()
    return {"unet": UNetWrapper, "vae_decoder": VaeDecoderWrapper, "vae_encoder": VaeEncoderWrapper}[spec.kind](module).eval()
