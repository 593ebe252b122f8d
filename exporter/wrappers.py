"""PyTorch modules whose forward takes exactly a component spec's inputs and returns its outputs.

These are what gets exported and what the exported graphs are compared against.
"""

from __future__ import annotations

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
    return {"unet": UNetWrapper, "vae_decoder": VaeDecoderWrapper, "vae_encoder": VaeEncoderWrapper}[spec.kind](module).eval()
