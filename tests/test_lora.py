"""LoRA adapters: fused at export (`export --lora`) and patched into an exported folder (`koala-trt lora`).

Adapters are random A/B tensors written here with safetensors, in diffusers/PEFT and kohya layouts,
over Linear and Conv layers of random:tiny's U-Net and both text encoders. Fused weights are checked
against the formula computed independently here and, where peft is installed, against diffusers' own
`load_lora_weights` + `fuse_lora(lora_scale=...)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

RANK = 2
# (module, layer path, alpha or None): a Linear in attention, 3x3 and 1x1 Convs, a Gemm Linear, CLIP layers.
LAYERS = [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", None),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", 4.0),
    ("unet", "down_blocks.0.resnets.0.conv1", 1.0),
    ("unet", "up_blocks.2.resnets.0.conv_shortcut", None),
    ("unet", "down_blocks.1.resnets.0.time_emb_proj", 3.0),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj", None),
    ("text_encoder", "encoder.layers.1.mlp.fc1", 1.0),
    ("text_encoder_2", "text_model.encoder.layers.0.self_attn.out_proj", None),
]
KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def _weights(source, module: str) -> dict[str, tuple[int, ...]]:
    from exporter.lora import layer_weights

    return layer_weights(source.build(module, device="meta"))


def make_adapter(source, path: Path, layers=LAYERS, kohya: bool = False, seed: int = 0, with_alpha: bool = True) -> dict:
    """Write a random adapter; returns {(module, layer): (A, B, alpha)} for the independent formula."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}
    truth = {}
    for module, layer, alpha in layers:
        shape = _weights(source, module)[layer + ".weight"]
        a = (rng.standard_normal((RANK, *shape[1:])) * 0.2).astype(np.float32)
        b = (rng.standard_normal((shape[0], RANK, *([1] * (len(shape) - 2)))) * 0.2).astype(np.float32)
        alpha = alpha if with_alpha else None
        if kohya:
            key = KOHYA[module] + ("text_model_" if module == "text_encoder" else "") + layer.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = a, b
            if alpha is not None:
                sd[f"{key}.alpha"] = np.array(alpha, dtype=np.float32)
        else:
            sd[f"{module}.{layer}.lora_A.weight"], sd[f"{module}.{layer}.lora_B.weight"] = a, b
            if alpha is not None:
                sd[f"{module}.{layer}.alpha"] = np.array(alpha, dtype=np.float32)
        truth[(module, layer)] = (a, b, alpha)
    save_file(sd, str(path))
    return truth


def expected_weight(w: np.ndarray, fused: list[tuple[dict, float]], module: str, layer: str) -> np.ndarray:
    """W + sum over adapters of scale x (alpha / rank) x B @ A, in float64 (independent of exporter.lora)."""
    out = w.astype(np.float64)
    for truth, scale in fused:
        if (module, layer) in truth:
            a, b, alpha = truth[(module, layer)]
            r = a.shape[0]
            d = b.reshape(b.shape[0], r).astype(np.float64) @ a.reshape(r, -1).astype(np.float64)
            out += scale * ((r if alpha is None else alpha) / r) * d.reshape(w.shape)
    return out


def _fused_modules(source, args: list[str]) -> dict[str, object]:
    from exporter.lora import fuse, parse_lora_arg, read_adapter

    adapters = [read_adapter(parse_lora_arg(a)) for a in args]
    mods = {}
    for module in ("unet", "text_encoder", "text_encoder_2"):
        mods[module] = source.build(module)
        fuse(mods[module], module, adapters)
    return mods


# Bound: the fused weight is W + B@A (|W| <= ~0.2, |delta| <= ~0.5) computed in float32 against the
# float64 formula: a few float32 ulps at magnitude < 1, so 1e-6 absolute holds on any CPU (no
# reductions longer than rank 2 are involved, so FMA or not changes the last bit at most).
ATOL = 1e-6


@pytest.mark.parametrize("kohya", [False, True], ids=["peft", "kohya"])
def test_fuse_matches_formula(tiny_source, tmp_path: Path, kohya: bool) -> None:
    t1 = make_adapter(tiny_source, tmp_path / "a.safetensors", kohya=kohya, seed=1)
    t2 = make_adapter(tiny_source, tmp_path / "b.safetensors", layers=LAYERS[:3], kohya=kohya, seed=2, with_alpha=False)
    mods = _fused_modules(tiny_source, [f"{tmp_path / 'a.safetensors'}:0.7", str(tmp_path / "b.safetensors")])
    for module, layer, _ in LAYERS:
        base = dict(tiny_source.build(module).named_parameters())[layer + ".weight"].detach().numpy()
        got = dict(mods[module].named_parameters())[layer + ".weight"].detach().numpy()
        want = expected_weight(base, [(t1, 0.7), (t2, 1.0)], module, layer)
        assert np.abs(got - base).max() > 1e-3, f"{module}.{layer} was not changed"
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"{module}.{layer}")
    # an untouched layer stays bit-identical
    untouched = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    assert np.array_equal(dict(mods["unet"].named_parameters())[untouched].detach().numpy(),
                          dict(tiny_source.build("unet").named_parameters())[untouched].detach().numpy())


@pytest.mark.parametrize("kohya", [False, True], ids=["peft", "kohya"])
def test_fuse_matches_diffusers(tiny_source, tmp_path: Path, kohya: bool) -> None:
    """diffusers' load_lora_weights + fuse_lora(lora_scale=0.6) on the same pipeline is the reference."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft")
    # diffusers' PEFT-layout loader takes no `.alpha` keys (its trainer stores alpha = rank); the
    # kohya layout carries per-layer alphas, which diffusers maps to PEFT's alpha_pattern.
    # kohya's trainer writes an alpha for every layer (diffusers gives a layer without one the file's
    # most common alpha, not its rank), so every kohya layer here has one.
    layers = LAYERS if not kohya else [(m, lay, 2.5 if a is None else a) for m, lay, a in LAYERS if m == "unet"]
    make_adapter(tiny_source, tmp_path / "a.safetensors", layers=layers, kohya=kohya, seed=3, with_alpha=kohya)
    pipe = tiny_source.pipeline()
    pipe.load_lora_weights(str(tmp_path / "a.safetensors"))
    pipe.fuse_lora(lora_scale=0.6, components=["unet", "text_encoder", "text_encoder_2"])
    pipe.unload_lora_weights()
    mods = _fused_modules(tiny_source, [f"{tmp_path / 'a.safetensors'}:0.6"])
    for module, layer, _ in layers:
        ref = dict(getattr(pipe, module).named_parameters())[layer + ".weight"].detach().numpy()
        got = dict(mods[module].named_parameters())[layer + ".weight"].detach().numpy()
        base = dict(tiny_source.build(module).named_parameters())[layer + ".weight"].detach().numpy()
        assert np.abs(ref - base).max() > 1e-3, f"diffusers did not change {module}.{layer}"
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL, err_msg=f"{module}.{layer}")
