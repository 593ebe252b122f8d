"""Feature caching (DeepCache) against its reference implementation: the `DeepCache` package's
DeepCacheSDHelper on diffusers' StableDiffusionXLPipeline of the same random weights, fed the same
initial latents (CPU; small sizes, few steps). random:tiny has no mid block, as KOALA-700M;
random:tiny-sdxl has one, as SDXL."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from exporter.manifest import load_manifest
from koala_core.errors import UsageError
from runtime.backend import open_backend
from sampler.loop import PipelineAssets, Request, Sampler
from conftest import run_cli

PROMPT = "a koala climbing a eucalyptus tree at sunset, photo"
SIZE = 128
BRANCH = 1  # conftest.tiny_cached_artifacts: tiny's top up block, layer 1: the feature entering the block (no cross-attention in the shallow part)


@pytest.fixture(scope="module")
def cached_artifacts(tiny_cached_artifacts: Path) -> Path:
    return tiny_cached_artifacts


def reference(preset: str, latents: np.ndarray, steps: int, guidance: float, interval: int, branch: int) -> np.ndarray:
    """DeepCacheSDHelper on diffusers' pipeline (validation/deepcache_reference.py: a missing mid block left unwrapped)."""
    import torch

    from exporter.sources import resolve
    from validation.deepcache_reference import deepcache
    from validation.reference import load_pipeline

    pipe = load_pipeline(resolve(f"random:{preset}"))
    n, _, h, w = latents.shape
    with deepcache(pipe, interval, branch):
        cached = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=h * 8, width=w * 8, num_images_per_prompt=n,
                      latents=torch.from_numpy(latents.copy()), output_type="np").images
    # Restored on the way out: the same pipeline is the uncached reference again.
    plain = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=h * 8, width=w * 8, num_images_per_prompt=n,
                 latents=torch.from_numpy(latents.copy()), output_type="np").images
    assert float(np.abs(plain - cached).max()) > 1e-3
    return cached


def _check(images: np.ndarray, ref: np.ndarray, uncached: np.ndarray | None = None) -> None:
    assert images.shape == ref.shape
    # FP32 rounding only (the sampler's own bound, tests/test_sampler.py): measured max abs <= 3e-6.
    assert float(np.abs(images - ref).max()) < 1e-4
    if uncached is not None:  # caching changed the image: the test can tell a cached run from a full one
        assert float(np.abs(uncached - ref).max()) > 1e-3


def test_export_checks_both_graphs(cached_artifacts: Path) -> None:
    m = load_manifest(cached_artifacts)
    for name in ("unet_deep", "unet_shallow"):
        c = m.view.components[name]
        assert c.check and c.check["passed"], c.check  # checked against PyTorch at export
        assert m.spec(name).extra["cache_branch"] == BRANCH and m.spec(name).kind == "unet"
    assert "deep_feature" in m.view.components["unet_deep"].check["outputs"]
    assert "unet" not in m.view.components
    assert [t.name for t in m.spec("unet_shallow").inputs] == ["sample", "timestep", "text_embeds", "time_ids", "deep_feature"]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_cached_sampler_equals_deepcache(backend: str, cached_artifacts: Path) -> None:
    m = load_manifest(cached_artifacts)
    kwargs = {"cpu_precision": "fp32"} if backend == "openvino" else {}
    sampler = Sampler(open_backend(backend, manifest=m, **kwargs), PipelineAssets.from_manifest(m))
    latents = np.random.default_rng(3).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    req = Request(PROMPT, steps=5, guidance=5.0, latents=latents, cache_interval=3)
    plan = sampler.plan(req)
    assert sampler.components(plan) == ["text_encoder", "text_encoder_2", "unet_deep", "unet_shallow", "vae_decoder"]
    images, timings = sampler.sample(plan, progress=False)
    assert len(timings.stages["unet"]) == 5
    full, _ = sampler.sample(sampler.plan(dataclasses.replace(req, cache_interval=1)), progress=False)
    _check(images, reference("tiny", latents, 5, 5.0, 3, BRANCH), full)


@pytest.mark.parametrize("branch", [0, 4])
def test_torch_reference_with_a_mid_block(branch: int) -> None:
    """tiny-sdxl has SDXL's mid block: DeepCache's helper unchanged; the torch backend splits at any branch."""
    from exporter.sources import resolve
    from runtime.torch_backend import TorchBackend

    src = resolve("random:tiny-sdxl")
    sampler = Sampler(TorchBackend(src), PipelineAssets.from_source(src))
    latents = np.random.default_rng(5).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    plan = sampler.plan(Request(PROMPT, steps=4, guidance=4.0, latents=latents, cache_interval=2, cache_branch=branch))
    images, _ = sampler.sample(plan, progress=False)
    _check(images, reference("tiny-sdxl", latents, 4, 4.0, 2, branch))


def test_bad_cache_requests(cached_artifacts: Path, tmp_path: Path) -> None:
    m = load_manifest(cached_artifacts)
    sampler = Sampler(open_backend("onnxruntime", manifest=m), PipelineAssets.from_manifest(m))
    req = Request(PROMPT, steps=4, height=SIZE, width=SIZE)
    for interval in (0, -2):
        with pytest.raises(UsageError, match="--cache-interval must be a whole number >= 1"):
            sampler.plan(dataclasses.replace(req, cache_interval=interval))
    with pytest.raises(UsageError, match=r"--cache-branch 2: this U-Net has branches 0, 1, 3, 4, 6, 7"):
        sampler.plan(dataclasses.replace(req, cache_interval=2, cache_branch=2))
    with pytest.raises(UsageError, match="split at branch 1; pass --cache-branch 1 or re-export"):
        sampler.plan(dataclasses.replace(req, cache_interval=2, cache_branch=3))
    with pytest.raises(UsageError, match="--cache-branch needs --cache-interval"):
        sampler.plan(dataclasses.replace(req, cache_branch=1))
    # A scheduler calling the U-Net twice per step (Heun's order 2) is refused, not cached per call.
    with pytest.raises(UsageError, match="calls it 2 times"):
        sampler.plan(dataclasses.replace(req, cache_interval=2, scheduler="heun"))
    for name in ("euler_a", "dpmpp_2m_karras", "ddim", "unipc", "lcm"):  # one U-Net call per step: cached
        assert sampler.plan(dataclasses.replace(req, cache_interval=2, scheduler=name)).cache_interval == 2
    # An artifacts folder (or engines set) holding unet_deep without its shallow graph.
    partial = Sampler(sampler.backend, dataclasses.replace(sampler.assets, specs={k: v for k, v in m.specs().items() if k != "unet_shallow"}))
    partial.specs.pop("unet_shallow")
    with pytest.raises(UsageError, match="only unet_deep is there: rebuild the engines with both"):
        partial.plan(dataclasses.replace(req, cache_interval=2))
    assert sampler.plan(dataclasses.replace(req, cache_interval=2)).cache_branch == BRANCH


def test_generate_cli_caches(cached_artifacts: Path, tmp_path: Path) -> None:
    import json

    out = tmp_path / "img.png"
    code, stdout, stderr = run_cli("generate", "-a", cached_artifacts, "-p", PROMPT, "--steps", 3, "--height", SIZE, "--width", SIZE,
                                   "--seed", 1, "--cache-interval", 2, "--no-progress", "--json", "-o", out)
    assert code == 0, stderr
    assert out.is_file() and json.loads(stdout)["cache"] == {"interval": 2, "branch": BRANCH, "deep_steps": 2, "shallow_steps": 1}
    code, _, stderr = run_cli("generate", "-a", cached_artifacts, "-p", PROMPT, "--cache-interval", 0, "-o", tmp_path / "x.png")
    assert code == 2 and "--cache-interval must be a whole number >= 1" in stderr and not (tmp_path / "x.png").exists()


def test_validate_end_to_end_against_deepcache(cached_artifacts: Path, tmp_path: Path) -> None:
    import json

    report = tmp_path / "report.json"
    code, _, stderr = run_cli("validate", "-a", cached_artifacts, "--steps", 3, "--height", SIZE, "--width", SIZE,
                              "--random-samples", 1, "--cache-interval", 2, "--report", report, "--json")
    assert code == 0, stderr[-2000:]
    data = json.loads(report.read_text())
    assert data["cache_interval"] == 2 and data["cache_branch"] == BRANCH
    assert {"unet_deep", "unet_shallow", "end_to_end"} <= {c["component"] for c in data["checks"]}


def test_bench_times_both_graphs_and_names_what_it_cannot(cached_artifacts: Path) -> None:
    """`bench -c unet_deep,unet_shallow`: a refresh step and a cached step alone, at the CFG batch,
    beside the end-to-end loop with caching; a component the artifacts lack is one line, exit 2."""
    import json

    code, out, err = run_cli("bench", "-a", cached_artifacts, "-c", "unet_deep,unet_shallow", "--steps", 3, "--cache-interval", 2,
                             "--height", SIZE, "--width", SIZE, "--warmup", "0", "--runs", "1", "--json", "--no-progress")
    assert code == 0, err
    result = json.loads(out)
    assert {k: v["batch"] for k, v in result["components"].items()} == {"unet_deep": 2, "unet_shallow": 2}
    assert result["end_to_end"]["steps"] == 3
    code, _, err = run_cli("bench", "-a", cached_artifacts, "-c", "controlnet", "--no-end-to-end", "--no-progress")
    assert code == 2 and "has no controlnet" in err and "Traceback" not in err
    code, _, err = run_cli("bench", "-a", cached_artifacts, "-c", "refiner", "--no-progress")
    assert code == 2 and "unknown component 'refiner'" in err
