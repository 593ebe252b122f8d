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


class UNetDeepWrapper(UNetWrapper):
    """unet_deep: the whole U-Net (diffusers' own forward) and, as `deep_feature`, the hidden state
    that enters the cache branch's up-block layer (the first `channels` of that resnet's input, which
    diffusers concatenates as [hidden state, skip connection])."""

    def __init__(self, unet: torch.nn.Module, spec: ComponentSpec) -> None:
        super().__init__(unet)
        self.spec = spec
        block = unet.up_blocks[len(unet.up_blocks) - 1 - spec.extra["cache_block"]]
        self.tap = block.resnets[len(block.resnets) - 1 - spec.extra["cache_layer"]]
        self.channels = int(spec.output("deep_feature").dims[1])

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        hook = self.tap.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, :self.channels]))
        try:
            out = super().forward(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        finally:
            hook.remove()
        return out, seen[0]


class UNetShallowWrapper(torch.nn.Module):
    """unet_shallow: what DeepCache recomputes on a cached step (exporter/cache_branch.py), written
    out of the U-Net's own modules in the order of diffusers' UNet2DConditionModel.forward (SDXL's
    case: no masks, no class labels, no adapters; sizes in the spec's granularity): time and added
    embeddings, conv_in, down blocks 0..k-1, the first c layers of down block k, then up block k
    from the cached `deep_feature`, the up blocks above it and the output head."""

    def __init__(self, unet: torch.nn.Module, spec: ComponentSpec) -> None:
        super().__init__()
        self.unet, self.k, self.c = unet, int(spec.extra["cache_block"]), int(spec.extra["cache_layer"])

    @staticmethod
    def _layer(block: torch.nn.Module, i: int, h: torch.Tensor, emb: torch.Tensor, ehs: torch.Tensor | None) -> torch.Tensor:
        h = block.resnets[i](h, emb)
        if getattr(block, "attentions", None):
            h = block.attentions[i](h, encoder_hidden_states=ehs, return_dict=False)[0]
        return h

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor, deep_feature: torch.Tensor) -> torch.Tensor:
        return self.shallow(sample, timestep, encoder_hidden_states, text_embeds, time_ids, deep_feature)

    def shallow(self, sample: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor | None,
                text_embeds: torch.Tensor, time_ids: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        u = self.unet
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
        aug = u.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        if ehs is not None:
            ehs = u.process_encoder_hidden_states(encoder_hidden_states=ehs, added_cond_kwargs=added)
        h = u.conv_in(sample)
        res = [h]
        for j in range(self.k):  # the down blocks above the branch, whole
            block = u.down_blocks[j]
            if getattr(block, "has_cross_attention", False):
                h, r = block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
            else:
                h, r = block(hidden_states=h, temb=emb)
            res.extend(r)
        for i in range(self.c):  # the branch's down block: its first c layers
            h = self._layer(u.down_blocks[self.k], i, h, emb, ehs)
            res.append(h)
        n = len(u.up_blocks)
        h = feature
        for ub in range(n - 1 - self.k, n):
            block = u.up_blocks[ub]
            first = len(block.resnets) - 1 - self.c if ub == n - 1 - self.k else 0
            for i in range(first, len(block.resnets)):
                h = torch.cat([h, res.pop()], dim=1)
                h = self._layer(block, i, h, emb, ehs)
            for up in block.upsamplers or []:
                h = up(h, None)
        if u.conv_norm_out:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)


class UNetShallowNoTextWrapper(UNetShallowWrapper):
    """unet_shallow of a branch without cross-attention (SDXL's and KOALA's top block, branch 0): the
    prompt's hidden states are not an input (the graph would not read them)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor,  # type: ignore[override]
                time_ids: torch.Tensor, deep_feature: torch.Tensor) -> torch.Tensor:
        return self.shallow(sample, timestep, None, text_embeds, time_ids, deep_feature)
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
    if spec.name in ("unet_deep", "unet_shallow"):  # feature caching's pair (specs.UNetSpec.cache_variants)
        if spec.name == "unet_deep":
            return UNetDeepWrapper(module, spec).eval()
        text = any(t.name == "encoder_hidden_states" for t in spec.inputs)
        return (UNetShallowWrapper if text else UNetShallowNoTextWrapper)(module, spec).eval()
    if spec.name == "unet_controlnet":
        return _named_forward(UNetControlNetWrapper, [t.name for t in spec.inputs])(module).eval()
    if spec.kind == "controlnet":
        return ControlNetWrapper(module).eval()
    return {"unet": UNetWrapper, "vae_decoder": VaeDecoderWrapper, "vae_encoder": VaeEncoderWrapper}[spec.kind](module).eval()
