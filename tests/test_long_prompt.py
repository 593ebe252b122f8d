"""Prompts over 77 tokens (ComfyUI's and compel's chunking) on random:tiny: the chunk ids, the
encoder states against the PyTorch encoders, the image against diffusers' StableDiffusionXLPipeline
fed the same chunked embeddings, and a prompt beyond the export's range refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporter.manifest import load_manifest
from exporter.specs import prompt_chunk_count, prompt_chunk_ids
from koala_core.errors import UsageError
from runtime.backend import OnnxRuntimeBackend
from sampler.loop import PipelineAssets, Request, Sampler, Timings
from validation.images import psnr
from tests.conftest import run_cli

PROMPT = "a koala climbing a eucalyptus tree at sunset, photo"
LONG = ", ".join([PROMPT] * 7)  # 160 tokens with random:tiny's tokenizers: 3 chunks of 75
TWO = ", ".join([PROMPT] * 4)  # 91 tokens: 2 chunks
TOO_LONG = ", ".join([PROMPT] * 11)  # 252 tokens: 4 chunks, past the default range of 3
SIZE = 128


@pytest.fixture(scope="module")
def sampler(tiny_artifacts: Path) -> Sampler:
    m = load_manifest(tiny_artifacts)
    return Sampler(OnnxRuntimeBackend(m), PipelineAssets.from_manifest(m))


@pytest.fixture(scope="module")
def pipe(tiny_source):
    p = tiny_source.pipeline()
    p.watermark = None
    p.set_progress_bar_config(disable=True)
    return p


def test_chunk_ids_exact() -> None:
    """<bos> + 75 ids + <eos> per chunk, padding after the last id, empty chunks past the prompt."""
    ids = list(range(10, 90))  # 80 ids: chunk 1 holds 10..84, chunk 2 holds 85..89
    got = prompt_chunk_ids(ids, 3, bos=1, eos=2, pad=7)
    assert got.dtype == np.int32 and got.shape == (3, 77)
    assert got[0].tolist() == [1, *range(10, 85), 2]
    assert got[1].tolist() == [1, 85, 86, 87, 88, 89, 2] + [7] * 70
    assert got[2].tolist() == [1, 2] + [7] * 75
    assert prompt_chunk_ids([], 1, 1, 2, 0)[0].tolist() == [1, 2] + [0] * 75  # the empty prompt: one chunk
    assert [prompt_chunk_count(n) for n in (0, 1, 75, 76, 150, 151, 225, 226)] == [1, 1, 1, 2, 2, 3, 3, 4]
    with pytest.raises(ValueError, match="80 tokens need more than 1 chunk"):
        prompt_chunk_ids(ids, 1, 1, 2, 0)


def test_tokenizer_chunks_against_transformers(tiny_artifacts: Path) -> None:
    """Each tokenizer's chunks from transformers' CLIPTokenizer ids (its own pad token: "<|endoftext|>"
    for the first, "!" for the second); a prompt of at most 75 tokens is what the pipeline tokenizes."""
    from transformers import CLIPTokenizer

    from sampler.tokenize import ClipTokenizer, chunk_prompts

    toks = [ClipTokenizer(tiny_artifacts / f) for f in ("tokenizer", "tokenizer_2")]
    ids = chunk_prompts(toks, [LONG, "blurry"])
    for folder, got in zip(("tokenizer", "tokenizer_2"), ids):
        ref = CLIPTokenizer.from_pretrained(str(tiny_artifacts / folder))
        raw = ref(LONG, add_special_tokens=False, verbose=False).input_ids
        assert len(raw) == 160 and got.shape == (2, 3, 77)
        bos, eos, pad = ref.bos_token_id, ref.eos_token_id, ref.pad_token_id
        for c in range(3):
            part = raw[75 * c:75 * (c + 1)]
            assert got[0, c].tolist() == [bos, *part, eos] + [pad] * (75 - len(part))
        short = ref("blurry", padding="max_length", max_length=77, truncation=True).input_ids
        assert got[1, 0].tolist() == short  # one chunk = the pipeline's own tokenization
        assert got[1, 1].tolist() == got[1, 2].tolist() == [bos, eos] + [pad] * 75  # padded with empty chunks
    assert toks[0].pad_id != toks[1].pad_id


def test_encoder_states_match_torch_encoders(sampler: Sampler, pipe) -> None:
    """[B, 77 k, 2048-like] hidden states and the first chunk's pooled output, negative padded with
    empty chunks; an empty negative prompt is zeros of the same length."""
    from calibration.prompt_embeds import pipeline_embeds

    plan = sampler.plan(Request(LONG, negative_prompt="blurry", steps=2, guidance=5.0, height=SIZE, width=SIZE, batch=2))
    assert plan.chunks == 3
    hidden, pooled = sampler.encode_prompt(plan, Timings(), warn=lambda m: None)
    ref = pipeline_embeds(pipe, LONG, "blurry")
    want_h = np.concatenate([ref["negative_prompt_embeds"].numpy()] * 2 + [ref["prompt_embeds"].numpy()] * 2)
    want_p = np.concatenate([ref["negative_pooled_prompt_embeds"].numpy()] * 2 + [ref["pooled_prompt_embeds"].numpy()] * 2)
    assert hidden.shape == want_h.shape == (4, 231, hidden.shape[2])
    # Bound: as test_sampler.test_prompt_embeddings_match_pipeline (FP32 rounding of ORT vs PyTorch over
    # 2-layer encoders, measured ~6e-7 on one chunk, the same per chunk here); a wrong chunk order,
    # pad id or pooled chunk is O(0.1).
    np.testing.assert_allclose(hidden, want_h, atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled, want_p, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(hidden[0, 77:154], hidden[0, 154:])  # two identical empty chunks
    # The pooled embedding is the first chunk's: the same as the 75-token prompt's own.
    first = sampler.encode_prompt(sampler.plan(Request(PROMPT, steps=2, guidance=1.0, height=SIZE, width=SIZE)),
                                  Timings(), warn=lambda m: None)
    assert first[0].shape[1] == 77
    plan = sampler.plan(Request(LONG, steps=2, guidance=5.0, height=SIZE, width=SIZE))
    hidden, pooled = sampler.encode_prompt(plan, Timings(), warn=lambda m: None)
    assert hidden.shape[:2] == (2, 231) and not hidden[0].any() and not pooled[0].any() and hidden[1].any()


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_image_matches_diffusers_with_chunked_embeddings(negative: str, sampler: Sampler, pipe) -> None:
    """The acceptance test: diffusers' pipeline fed the PyTorch encoders' chunked embeddings."""
    import torch

    from calibration.prompt_embeds import pipeline_embeds

    prompt = TWO if negative else LONG
    latents = np.random.default_rng(3).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    plan = sampler.plan(Request(prompt, negative_prompt=negative, steps=2, guidance=5.0, latents=latents))
    assert plan.chunks == (2 if negative else 3)
    images, _ = sampler.sample(plan, progress=False)
    pipe.scheduler = type(pipe.scheduler).from_config(sampler.assets.scheduler_config)
    ref = pipe(**pipeline_embeds(pipe, prompt, negative), num_inference_steps=2, guidance_scale=5.0, height=SIZE, width=SIZE,
               latents=torch.from_numpy(latents.copy()), output_type="np").images
    assert images.shape == ref.shape == (1, SIZE, SIZE, 3)
    # PNG-rounding level, as tests/test_sampler.py: PSNR >= 40 dB, and max abs < 1e-4 (FP32 rounding of
    # ORT vs PyTorch, ~1e-6 per step on AVX2 and AVX-512/AMX CPUs alike; 1/255 = 3.9e-3 is a PNG level).
    assert psnr(images, ref) >= 40.0, psnr(images, ref)
    assert float(np.abs(images - ref).max()) < 1e-4


def test_prompt_beyond_the_range_is_refused(sampler: Sampler) -> None:
    msg = ("the prompt is 252 tokens but unet takes at most 225 (3 chunk(s) of 75, 231 encoder tokens); shorten the "
           "prompt, or re-export with `koala-trt export --max-prompt-chunks N`")
    with pytest.raises(UsageError) as e:
        sampler.plan(Request(TOO_LONG, height=SIZE, width=SIZE))
    assert str(e.value) == msg
    with pytest.raises(UsageError) as e:  # a long negative prompt counts as well
        sampler.plan(Request(PROMPT, negative_prompt=TOO_LONG, height=SIZE, width=SIZE))
    assert str(e.value) == msg


def test_generate_refuses_a_prompt_beyond_the_range(tiny_artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "x.png"
    code, stdout, stderr = run_cli("generate", "--artifacts", tiny_artifacts, "--prompt", TOO_LONG, "--height", "128",
                                   "--width", "128", "--steps", "2", "--no-progress", "--out", out)
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("Error: the prompt is 252 tokens but unet takes at most 225 (3 chunk(s) of 75, 231 encoder "
                              "tokens); shorten the prompt, or re-export with `koala-trt export --max-prompt-chunks N`")
    assert not out.parent.exists()


def test_export_records_the_range_and_profiles_carry_it(tiny_artifacts: Path, tmp_path: Path) -> None:
    """The manifest's unet range holds the prompt chunks; the build plan's profile takes min 77, opt 77,
    max 231 tokens from it, a profile's [shapes] prompt_chunks narrows it, and one past it is refused."""
    import json

    from engines.profile import load_profile

    m = load_manifest(tiny_artifacts)
    assert m.shape_range("unet").prompt_chunks == (1, 1, 3)
    assert m.spec("unet").input("encoder_hidden_states").dims[1] == "sequence"
    assert m.shape_range("text_encoder").prompt_chunks is None
    base = (Path(__file__).parents[1] / "engines" / "profiles" / "rtx4090.toml").read_text()
    args = ("--onnx", tiny_artifacts, "--precision", "fp32", "--height", "128", "--width", "128", "--batch", "1",
            "--dry-run", "--no-estimate", "--out", tmp_path / "e")
    static = tmp_path / "one.toml"
    static.write_text(base.replace("[shapes]", "[shapes]\nprompt_chunks = 1"))
    assert load_profile(static).shapes.prompt_chunks == (1, 1, 1)
    code, out, err = run_cli("build", *args, "--profile", static, "-c", "unet", "--json")
    assert code == 0, err
    unet = json.loads(out)["components"]["unet"]
    assert unet["static"] and unet["inputs"]["encoder_hidden_states"]["max"][1] == 77
    wide = tmp_path / "wide.toml"
    wide.write_text(base.replace("[shapes]", "[shapes]\nprompt_chunks = [1, 1, 4]"))
    code, _, err = run_cli("build", *args, "--profile", wide, "-c", "unet")
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"Error: unet: input encoder_hidden_states needs prompt_chunks 1..4, outside the range its export recorded "
        f"(1..3 chunks of 77 tokens, {tiny_artifacts.resolve()}); set [shapes] prompt_chunks within it, or re-export "
        f"with --max-prompt-chunks 4")


def test_export_options_and_dynamic_axis(tmp_path: Path) -> None:
    """--max-prompt-chunks N sets the U-Net's range (1..N); N = 1 traces the axis fixed at 77."""
    from exporter.onnx_export import _dynamic_shapes, trace_chunks
    from exporter.sources import resolve
    from exporter.specs import default_range, specs_from_configs

    spec = specs_from_configs(resolve("random:tiny").configs)["unet"]
    r = default_range(spec, 2, 256, 256, 5)
    assert r.prompt_chunks == (1, 1, 5) and trace_chunks(r) == 2
    assert str(_dynamic_shapes(spec, r)["encoder_hidden_states"][1]) == "77*prompt_chunks"
    one = default_range(spec, 2, 256, 256, 1)
    assert trace_chunks(one) == 1 and 1 not in _dynamic_shapes(spec, one)["encoder_hidden_states"]
    assert spec.input_shapes(2, 256, 256, chunks=3)["encoder_hidden_states"][1] == 231
    code, _, err = run_cli("export", "--model", "random:tiny", "--out", tmp_path / "x", "--static", "--max-prompt-chunks", "2")
    assert code == 2 and err.strip() == ("Error: --max-prompt-chunks does not apply with --static (a static U-Net takes one "
                                          "chunk of 77 tokens)")
    assert not (tmp_path / "x").exists()


def test_validate_refuses_a_prompt_beyond_the_range(tiny_artifacts: Path, tmp_path: Path) -> None:
    """validate checks its prompts against the U-Net's range before the PyTorch reference runs."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n{TOO_LONG}\n")
    report = tmp_path / "r.json"
    code, _, err = run_cli("validate", "--artifacts", tiny_artifacts, "--height", "128", "--width", "128", "--steps", "1",
                           "--prompts", prompts, "--report", report)
    assert code == 2 and "Traceback" not in err and "reference:" not in err
    assert err.strip().splitlines()[-1] == ("Error: the prompt is 252 tokens but unet takes at most 225 (3 chunk(s) of 75, "
                                            "231 encoder tokens); shorten the prompt, or re-export with `koala-trt export "
                                            "--max-prompt-chunks N`")
    assert not report.exists()


def test_calibration_capture_records_chunked_states(tiny_source, pipe, tmp_path: Path) -> None:
    """`calibrate` feeds the PyTorch pipeline the chunked embeddings: the U-Net sees [2, 231, D] (zero
    negative half), as the sampler gives it."""
    from calibration.capture import CaptureOptions, capture
    from calibration.prompt_embeds import pipeline_embeds

    cs = capture(tiny_source, tmp_path / "calib", CaptureOptions(prompts=[LONG], steps=1, height=SIZE, width=SIZE),
                 log=lambda m: None)
    shard = np.load(cs.root / cs.view.shards[0].file)
    ehs = shard["encoder_hidden_states"]
    assert ehs.shape == (2, 231, 96) and not ehs[0].any()
    ref = pipeline_embeds(pipe, LONG)
    np.testing.assert_array_equal(ehs[1], ref["prompt_embeds"][0].numpy())  # the same PyTorch encoders: bit for bit
    np.testing.assert_array_equal(shard["text_embeds"][1], ref["pooled_prompt_embeds"][0].numpy())
