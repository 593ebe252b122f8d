"""The memory planner: the activation tracer on hand-countable modules, and the KOALA paper's verdicts
at 1024x1024 (KOALA-700M fits the 8 GB RTX 3060 Ti, SDXL-Base does not; both fit the 24 GB RTX 4090)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli

GIB = 1 << 30


def test_tracer_counts_live_intermediates_only() -> None:
    from engines.activations import trace_activations

    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(10, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 10))
        x = torch.empty(4, 10)
    t = trace_activations(net, {"input": x})
    # Linear1's output (4x1000 fp32) and ReLU's output live together; weights and the input are not counted.
    assert t.peak_bytes == 2 * 4 * 1000 * 4
    half = trace_activations(net.half(), {"input": x.half()})
    assert half.peak_bytes == t.peak_bytes // 2


class _Attention(torch.nn.Module):
    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        b, n, _ = q.shape
        q = q.view(b, n, self.heads, self.head_dim).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q)


def test_fused_attention_is_counted_without_the_score_matrix() -> None:
    from engines.activations import FUSED_ATTENTION_MAX_HEAD_DIM, trace_activations

    tokens = 1024
    small = trace_activations(_Attention(8, 64), {"q": torch.empty(1, tokens, 512, device="meta")})
    assert small.fused_attention_calls == 1 and small.unfused_attention_calls == 0
    assert small.peak_bytes < tokens * tokens * 4  # no tokens x tokens matrix
    wide = trace_activations(_Attention(1, 512), {"q": torch.empty(1, tokens, 512, device="meta")})
    assert 512 > FUSED_ATTENTION_MAX_HEAD_DIM and wide.unfused_attention_calls == 1
    assert wide.peak_bytes >= tokens * tokens * 4  # the score matrix is materialized


@pytest.fixture(scope="module")
def paper_plans() -> dict:
    from engines.planner import plan_memory
    from engines.profile import load_profile
    from exporter.sources import resolve

    out = {}
    for model in ("koala-700m", "koala-1b", "sdxl-base"):
        source = resolve(f"random:{model}")
        for card in ("rtx3060ti", "rtx4090"):
            out[model, card] = plan_memory(source, load_profile(card))
    return out


def test_paper_finding_at_1024(paper_plans: dict) -> None:
    assert paper_plans["koala-700m", "rtx3060ti"].fits
    assert not paper_plans["sdxl-base", "rtx3060ti"].fits
    for model in ("koala-700m", "koala-1b", "sdxl-base"):
        assert paper_plans[model, "rtx4090"].fits
    # Verdicts come with their margin, resident case by default.
    v = paper_plans["sdxl-base", "rtx3060ti"].verdict()
    assert v["mode"] == "resident" and v["margin_bytes"] < 0 and v["complete"]


def test_plan_components_and_peaks(paper_plans: dict) -> None:
    p = paper_plans["koala-700m", "rtx3060ti"]
    c = p.components
    assert list(c) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    # Known configs: CLIP ViT-L/14's text tower, OpenCLIP bigG's with its projection, SDXL's VAE decoder
    # (the published counts of the diffusers checkpoints) and KOALA-700M's U-Net (the paper's 782M).
    assert {n: m.parameters for n, m in c.items()} == {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                                                       "unet": 782_822_724, "vae_decoder": 49_490_199}
    assert c["unet"].weights_bytes == 2 * 782_822_724  # fp16
    assert c["vae_decoder"].weights_bytes == 4 * 49_490_199  # fp32 VAE policy
    assert c["unet"].max_shapes["sample"] == (2, 4, 128, 128)  # CFG batch at 1024x1024
    assert c["unet"].max_shapes["encoder_hidden_states"] == (2, 231, 2048)  # the longest prompt: 3 chunks of 77
    # I/O in FP32 at 1024 px, CFG batch 2, counted by hand: sample 2*4*128*128 + timestep 2 + hidden states
    # at the longest prompt the engine takes (the profile leaves prompt_chunks to the export: its default
    # 3 chunks, 231 tokens) 2*231*2048 + text_embeds 2*1280 + time_ids 2*6 + out_sample 2*4*128*128
    # = 1,210,894 values (580,110 at one 77-token chunk, as the planner counted before); the VAE
    # decoder at batch 1: latents 4*128*128 + image 3*1024*1024 = 3,211,264; text_encoder: int32 ids 2*77
    # + hidden states 2*77*768 = 118,426.
    assert (c["unet"].io_bytes, c["vae_decoder"].io_bytes, c["text_encoder"].io_bytes) == (4 * 1_210_894, 4 * 3_211_264, 4 * 118_426)
    assert p.sequential_peak < p.resident_peak
    s = paper_plans["sdxl-base", "rtx3060ti"].components["unet"]
    assert (s.parameters, s.weights_bytes) == (2_567_463_684, 2 * 2_567_463_684)  # SDXL-Base's 2.57B U-Net, fp16


def test_peaks_of_a_hand_counted_plan() -> None:
    """Two made-up components, summed by hand: resident = overhead + every component's weights and I/O
    + the largest activations; one at a time = overhead + the largest weights + I/O + activations."""
    from engines.planner import ComponentMemory, MemoryPlan
    from engines.profile import load_profile

    a = ComponentMemory("unet", "fp16", 5, 10, "parameters", 50, 1, {})
    b = ComponentMemory("vae_decoder", "fp32", 5, 20, "parameters", 5, 2, {})
    p = MemoryPlan("toy", load_profile("rtx3060ti"), "resident", {"unet": a, "vae_decoder": b}, overhead_bytes=100)
    assert p.resident_peak == 100 + (10 + 1) + (20 + 2) + 50 == 183
    assert p.sequential_peak == 100 + (10 + 1 + 50) == 161
    assert p.peak == 183 and p.margin_bytes == p.usable_bytes - 183


def test_int8_weights_sit_between_one_and_two_bytes() -> None:
    from engines.planner import plan_memory
    from engines.profile import load_profile
    from exporter.sources import resolve

    p = plan_memory(resolve("random:koala-700m"), load_profile("rtx3060ti").with_overrides(precision="int8"),
                    components=["unet"])
    u = p.components["unet"]
    assert u.parameters < u.weights_bytes < 1.1 * u.parameters


def test_plan_cli_json_and_sequential_verdict() -> None:
    code, out, err = run_cli("plan", "--model", "random:sdxl-base", "--profile", "rtx3060ti", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["fits"] is False and d["mode"] == "resident"
    assert d["resident_peak_bytes"] > d["usable_bytes"] >= d["sequential_peak_bytes"]
    code, out, _ = run_cli("plan", "--model", "random:sdxl-base", "--profile", "rtx3060ti", "--residency", "sequential", "--json")
    assert json.loads(out)["fits"] is True  # one component at a time, SDXL-Base fits the 8 GB card
    code, out, _ = run_cli("plan", "--model", "random:koala-700m", "--profile", "rtx3060ti")
    assert code == 0 and "verdict (resident): FITS" in out


def test_unet_planned_at_the_profiles_longest_prompt() -> None:
    """The U-Net's I/O and activations at the profile's largest prompt_chunks: a one-chunk profile
    gives 77 tokens, a longer range more bytes; the text encoders, whose input is one chunk, stay."""
    from dataclasses import replace

    from engines.planner import plan_memory
    from engines.profile import load_profile
    from exporter.sources import resolve

    source, base = resolve("random:tiny"), load_profile("rtx3060ti").with_overrides(batch=1, height=256, width=256)
    plans = {n: plan_memory(source, replace(base, shapes=replace(base.shapes, prompt_chunks=(1, 1, n))), ["unet", "text_encoder"])
             for n in (1, 2)}
    one, two = (plans[n].components for n in (1, 2))
    assert one["unet"].max_shapes["encoder_hidden_states"][1] == 77 and two["unet"].max_shapes["encoder_hidden_states"][1] == 154
    ctx = one["unet"].max_shapes["encoder_hidden_states"][2]
    # 77 more positions x the context width x the CFG batch, in the graph's FP32 I/O (4 bytes)
    assert two["unet"].io_bytes - one["unet"].io_bytes == 2 * 77 * ctx * 4
    assert two["unet"].activations_bytes >= one["unet"].activations_bytes
    assert two["text_encoder"].io_bytes == one["text_encoder"].io_bytes
