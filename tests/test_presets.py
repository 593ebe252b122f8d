"""Built-in presets: full-size parameter counts (meta device), the tiny KOALA shape, the tokenizer."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

# KOALA paper / model card, Table 1: U-Net parameters.
PAPER_UNET = {"random:koala-700m": 782e6, "random:koala-lightning-700m": 782e6, "random:koala-1b": 1161e6, "random:sdxl-base": 2567e6}


@pytest.mark.parametrize("preset", sorted(PAPER_UNET))
def test_full_size_unet_parameters_match_the_paper(preset: str) -> None:
    code, out, err = run_cli("inspect", preset, "--json")
    assert code == 0, err
    info = json.loads(out)
    unet = info["components"]["unet"]["parameters"]
    assert abs(unet - PAPER_UNET[preset]) / PAPER_UNET[preset] < 0.01
    # The real SDXL text encoders and VAE: CLIP ViT-L 123M, OpenCLIP bigG 695M, VAE 84M.
    assert info["components"]["text_encoder"]["parameters"] == 123_060_480
    assert info["components"]["text_encoder_2"]["parameters"] == 694_659_840
    assert info["components"]["vae"]["parameters"] == 83_653_863


def test_koala_shapes() -> None:
    from exporter.sources import resolve

    k700, k1b, sdxl, light = (resolve(f"random:{n}").configs for n in ("koala-700m", "koala-1b", "sdxl-base", "koala-lightning-700m"))
    assert k700["unet"]["mid_block_type"] is None and k700["unet"]["layers_per_block"] == 1
    assert k700["unet"]["transformer_layers_per_block"] == [1, 2, 5]
    assert k1b["unet"]["mid_block_type"] == "UNetMidBlock2DCrossAttn" and k1b["unet"]["transformer_layers_per_block"] == [1, 2, 6]
    assert sdxl["unet"]["layers_per_block"] == 2 and sdxl["unet"]["transformer_layers_per_block"] == [1, 2, 10]
    assert light["scheduler"]["timestep_spacing"] == "trailing"
    assert resolve("random:koala-lightning-700m").sampler.steps == 10
    assert resolve("random:koala-lightning-700m").sampler.guidance == 3.5


def test_tiny_is_koala_shaped(tiny_source) -> None:
    unet = tiny_source.build("unet")
    assert unet.mid_block is None
    assert all(len(b.resnets) == 1 for b in unet.down_blocks)
    depths = [len(b.attentions[0].transformer_blocks) for b in unet.down_blocks if hasattr(b, "attentions")]
    assert depths == [1, 2]
    assert sum(p.numel() for p in unet.parameters()) < 5e6


def test_random_weights_are_the_same_in_every_build(tiny_source) -> None:
    import torch

    a, b = tiny_source.build("unet"), tiny_source.build("unet")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = tiny_source.build("text_encoder")
    assert not torch.equal(next(a.parameters()).flatten()[:4], next(c.parameters()).flatten()[:4])


def test_generated_tokenizers_are_clip_compatible(tiny_source) -> None:
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    tok1, tok2 = tiny_source.tokenizer_dirs()
    t1, t2 = CLIPTokenizer.from_pretrained(str(tok1)), CLIPTokenizer.from_pretrained(str(tok2))
    prompt = "A portrait painting of a Golden Retriever like Leonardo da Vinci, 4k!"
    ids1 = t1(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    ids2 = t2(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    vocab = t1.vocab_size if hasattr(t1, "vocab_size") else len(t1)
    eos = t1.convert_tokens_to_ids("<|endoftext|>")
    assert ids1[0] == t1.convert_tokens_to_ids("<|startoftext|>") and eos == max(t1.get_vocab().values())
    assert eos in ids1 and len(ids1) == 77
    assert t2.pad_token_id == 0 and ids2[-1] == 0 and ids1[-1] == eos  # SDXL: tokenizer_2 pads with "!"
    assert max(ids1) < vocab
    # the tokenizer.json the torch-free runtime reads gives the same ids
    raw = Tokenizer.from_file(str(tok1 / "tokenizer.json")).encode(prompt).ids
    assert raw == [i for i in ids1 if i != eos] + [eos]
