"""ControlNet (Zhang et al. 2023) for SDXL/KOALA U-Nets: where its weights come from, the residuals it
hands the U-Net, and the one check that they fit.

`export --controlnet DIR_OR_HUB_ID` loads a diffusers ControlNetModel from a local folder or a hub id;
`--controlnet random:` builds one from the model's own U-Net config with random weights (its zero
convolutions random too, so tests can see it act). diffusers' `ControlNetModel.from_unet` and its
constructor refuse `mid_block_type: null` (KOALA-700M's U-Net has no mid block); the U-Net adds the
ControlNet's mid residual even then (to the last down block's output, where the mid block would
be), so a ControlNet configured without a mid block is built here as diffusers' model with its mid
block removed (its forward skips a missing mid block), and loaded from its weights file directly.

The residual layout is diffusers' rule for UNet2DConditionModel and ControlNetModel alike: conv_in's
output, then per down block one per ResNet (layers_per_block) and one for the downsampler (all but the
last block). numpy/json only at import: the specs and the sampler use the layout without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from koala_core.errors import KoalaError, UsageError

RANDOM_CONTROLNET = "random:"
CONTROLNET_COMPONENTS = ("controlnet", "unet_controlnet")
# What ControlNetModel.from_unet copies from the U-Net's config (diffusers 0.27-0.42), besides
# mid_block_type, which may be null here.
_FROM_UNET = ("encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type", "addition_time_embed_dim",
              "transformer_layers_per_block", "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
              "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
              "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
              "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
              "num_class_embeds", "upcast_attention", "resnet_time_scale_shift", "projection_class_embeddings_input_dim")
# What must agree for the ControlNet to take the U-Net's own inputs (sample, prompt, pooled, time ids).
_SHARED_INPUTS = ("in_channels", "cross_attention_dim", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


@dataclass(frozen=True)
class Residual:
    """One residual the ControlNet adds to a U-Net skip connection: its channels, its downscale from
    the latents (1, 2, 4, ...) and where it comes from."""

    channels: int
    scale: int
    where: str  # "conv_in", "down block 1 resnet 0", "down block 1 downsampler", "mid block"

    def dims(self, axis: str) -> str:
        """The spec's symbolic dim of this residual on `axis` (latent_height, latent_width)."""
        return axis if self.scale == 1 else f"{axis}/{self.scale}"


def _per_block(value: Any, blocks: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * blocks


def residual_layout(cfg: Mapping[str, Any]) -> tuple[list[Residual], Residual]:
    """(down residuals, mid residual) of a U-Net or ControlNet config, as diffusers orders them."""
    channels = [int(c) for c in cfg["block_out_channels"]]
    blocks = len(cfg["down_block_types"])
    layers = _per_block(cfg.get("layers_per_block", 2), blocks)
    down = [Residual(channels[0], 1, "conv_in")]
    for i in range(blocks):
        down += [Residual(channels[i], 2 ** i, f"down block {i} resnet {j}") for j in range(layers[i])]
        if i < blocks - 1:
            down.append(Residual(channels[i], 2 ** (i + 1), f"down block {i} downsampler"))
    return down, Residual(channels[-1], 2 ** (blocks - 1), "mid block")


def check_fits(controlnet_cfg: Mapping[str, Any], unet_cfg: Mapping[str, Any], what: str = "the ControlNet") -> None:
    """The ControlNet's residuals and inputs fit the U-Net: UsageError naming the first mismatching
    block (before any weight is read)."""
    for key in _SHARED_INPUTS:
        a, b = controlnet_cfg.get(key), unet_cfg.get(key)
        if a is not None and b is not None and a != b:
            raise UsageError(f"{what} does not fit the U-Net: its {key} is {a}, the U-Net's {b}")
    c_down, c_mid = residual_layout(controlnet_cfg)
    u_down, u_mid = residual_layout(unet_cfg)
    for i, (c, u) in enumerate(zip(c_down, u_down)):
        if (c.channels, c.scale) != (u.channels, u.scale):
            raise UsageError(f"{what} does not fit the U-Net: down residual {i} ({c.where}) is {c.channels} channels at 1/{c.scale} "
                             f"of the latents, the U-Net's {u.where} is {u.channels} channels at 1/{u.scale}")
    if len(c_down) != len(u_down):
        first = u_down[len(c_down)] if len(u_down) > len(c_down) else c_down[len(u_down)]
        raise UsageError(f"{what} does not fit the U-Net: it gives {len(c_down)} down residuals, the U-Net takes {len(u_down)} "
                         f"(first unmatched: {first.where})")
    if (c_mid.channels, c_mid.scale) != (u_mid.channels, u_mid.scale):
        raise UsageError(f"{what} does not fit the U-Net: its mid residual is {c_mid.channels} channels at 1/{c_mid.scale}, "
                         f"the U-Net's mid block takes {u_mid.channels} at 1/{u_mid.scale}")


def config_from_unet(unet_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A ControlNetModel config for `unet_cfg`, as ControlNetModel.from_unet writes it, except that a U-Net
    without a mid block (mid_block_type null, KOALA-700M) gives a ControlNet without one."""
    cfg: dict[str, Any] = {"_class_name": "ControlNetModel"}
    cfg.update({k: unet_cfg[k] for k in _FROM_UNET if k in unet_cfg})
    cfg["mid_block_type"] = unet_cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    cfg.update(conditioning_channels=3, controlnet_conditioning_channel_order="rgb",
               conditioning_embedding_out_channels=[16, 32, 96, 256])
    return cfg


def _config_dir(root: Path) -> Path:
    """A ControlNet folder (config.json + weights), or a pipeline folder holding one in controlnet/."""
    for d in (root, root / "controlnet"):
        if (d / "config.json").is_file():
            return d
    raise UsageError(f"--controlnet {root}: not a ControlNetModel folder (no config.json)")


def read_config(root: Path) -> dict[str, Any]:
    from koala_core.jsonfile import read_json

    d = _config_dir(root)
    cfg = read_json(d / "config.json")
    if cfg.get("_class_name") not in (None, "ControlNetModel"):
        raise UsageError(f"--controlnet {d}: config is a {cfg.get('_class_name')}, not a ControlNetModel")
    if cfg.get("global_pool_conditions"):
        raise UsageError(f"--controlnet {d}: global_pool_conditions (guess mode) ControlNets are not supported")
    return cfg


def download(ref: str) -> Path:
    """A hub id's ControlNet snapshot (config and safetensors weights only)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError("loading a hub id needs huggingface_hub (pip install 'koala-trt[export]')") from None
    try:
        return Path(snapshot_download(ref, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"]))
    except Exception as e:  # offline, unknown repo, gated: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KoalaError(f"cannot download ControlNet {ref!r} from the Hugging Face Hub ({reason[:160]}); download it where the "
                         f"network allows and pass the local folder instead: --controlnet /path/to/{ref.split('/')[-1]}") from None


def resolve_controlnet(ref: str, unet_cfg: Mapping[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """--controlnet: (its config, its folder; None for `random:`), checked against the U-Net."""
    from exporter.sources import HUB_ID

    if ref == RANDOM_CONTROLNET:
        return config_from_unet(unet_cfg), None
    if ref.startswith(RANDOM_CONTROLNET):
        raise UsageError(f"--controlnet {ref}: the random ControlNet is `random:` (built from the model's own U-Net config)")
    path = Path(ref).expanduser()
    if path.exists():
        root = path.resolve()
        if not root.is_dir():
            raise UsageError(f"--controlnet {ref}: not a folder")
    elif HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        root = download(ref)
    else:
        raise UsageError(f"--controlnet {ref!r} not found: not a folder, not a hub id, not `random:`")
    root = _config_dir(root)
    cfg = read_config(root)
    check_fits(cfg, unet_cfg, f"--controlnet {ref}")
    return cfg, root


def build(cfg: Mapping[str, Any], root: Path | None, seed: int, device: str = "cpu") -> Any:
    """The ControlNetModel in float32 eval mode: random weights (seeded) for root None, else from root."""
    import torch
    from diffusers import ControlNetModel

    no_mid = cfg.get("mid_block_type") is None
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if no_mid:
        kwargs["mid_block_type"] = "UNetMidBlock2D"  # built, then removed: the forward skips a missing mid block
    with torch.device("meta"):
        model = ControlNetModel.from_config(kwargs)
    if no_mid:
        model.mid_block = None
        model.register_to_config(mid_block_type=None)
    if device == "meta":
        return model.eval().requires_grad_(False)
    model = model.to_empty(device=device)
    if root is None:
        from exporter.sources import random_init

        random_init(model, seed)
    else:
        state = _read_weights(root)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)[:2]
        if missing or unexpected:
            names = (missing or unexpected)[:3]
            raise KoalaError(f"--controlnet {root}: weights do not match its config ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected, e.g. {', '.join(names)})")
    return model.float().eval().requires_grad_(False)


def _read_weights(root: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    for name in WEIGHT_FILES:
        if (root / name).is_file():
            return load_file(str(root / name))
    for name in WEIGHT_FILES:
        index = root / (name + ".index.json")
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, Any] = {}
            for shard in shards:
                state.update(load_file(str(root / shard)))
            return state
    raise KoalaError(f"--controlnet {root}: no safetensors weights ({' or '.join(WEIGHT_FILES)})")
