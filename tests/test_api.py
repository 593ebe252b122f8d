"""The Python API (sampler/api.py, re-exported by koala_trt): diffusers' argument names, lists of
prompts as diffusers takes them, the same pixels as the sampler and `koala-trt generate`, one-line
UsageErrors for bad input, no torch for onnxruntime, and the README's example run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
SIZE, STEPS = 128, 3
SMALL = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE}


@pytest.fixture(scope="module")
def pipe(tiny_artifacts: Path):  # type: ignore[no-untyped-def]
    from koala_trt import Pipeline

    with Pipeline.from_artifacts(tiny_artifacts) as p:
        p.set_progress_bar_config(disable=True)
        yield p


def test_one_prompt_gives_pil_images_and_timings(pipe) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    out = pipe("a koala in a eucalyptus tree", negative_prompt="blurry", seed=3, num_images_per_prompt=2, **SMALL)
    assert len(out.images) == 2 and all(isinstance(i, Image.Image) and i.size == (SIZE, SIZE) for i in out.images)
    assert np.asarray(out.images[0]).std() > 1  # random weights: coloured noise, not a flat image
    summary = out.timings.summary()
    assert summary["stages"]["unet"]["calls"] == STEPS and summary["total_ms"] > 0
    [plan] = out.plans
    assert (plan.seed, plan.batch, plan.steps, plan.guidance) == (3, 2, STEPS, 5.0)  # guidance: the model's default


def test_defaults_come_from_the_model(pipe) -> None:  # type: ignore[no-untyped-def]
    [plan] = pipe.plan(pipe.requests("a koala"))
    a = pipe.assets
    assert (plan.steps, plan.guidance, plan.height, plan.width, plan.batch, plan.seed) == (a.steps, a.guidance, a.height, a.width, 1, 0)


def test_a_list_of_prompts_is_prompt_by_prompt(pipe) -> None:  # type: ignore[no-untyped-def]
    """As diffusers: num_images_per_prompt images per prompt, in prompt order, each prompt with its own
    negative prompt; image n of the call starts from seed + n, so it equals a one-prompt call."""
    prompts, negatives = ["a koala", "a eucalyptus tree"], ["blurry", "dark"]
    both = pipe(prompts, negative_prompt=negatives, num_images_per_prompt=2, seed=10, output_type="np", **SMALL)
    assert both.images.shape == (4, SIZE, SIZE, 3) and [p.seed for p in both.plans] == [10, 12]
    second = pipe(prompts[1], negative_prompt=negatives[1], num_images_per_prompt=2, seed=12, output_type="np", **SMALL)
    np.testing.assert_array_equal(both.images[2:], second.images)
    assert both.timings.summary()["stages"]["unet"]["calls"] == 2 * STEPS
    # one negative prompt for all prompts; latents split per prompt as diffusers' one batch
    lat = np.random.default_rng(0).standard_normal((2, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    split = pipe(prompts, negative_prompt="blurry", latents=lat, output_type="np", **SMALL)
    alone = pipe(prompts[1], negative_prompt="blurry", latents=lat[1:], output_type="np", **SMALL)
    np.testing.assert_array_equal(split.images[1:], alone.images)


def test_same_pixels_as_generate(pipe, tiny_artifacts: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    image = pipe("a koala reading a newspaper", seed=4, **SMALL).images[0]
    code, _, err = run_cli("generate", "--artifacts", tiny_artifacts, "--prompt", "a koala reading a newspaper", "--seed", "4",
                           "--steps", STEPS, "--height", SIZE, "--width", SIZE, "--out", tmp_path / "g.png", "--no-progress")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png").convert("RGB")), np.asarray(image))


def test_latent_output(pipe) -> None:  # type: ignore[no-untyped-def]
    out = pipe("a koala", output_type="latent", **SMALL)
    assert out.images.shape == (1, 4, SIZE // 8, SIZE // 8) and out.images.dtype == np.float32


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 100}, "height and width must be positive multiples of 8 (got 100x128)"),
    ({"height": 136}, "unet: height and width must be multiples of 32"),
    ({"height": 1024}, "outside the sizes unet was exported for"),
    ({"height": 128.5}, "height must be a whole number (got 128.5)"),
    ({"prompt": []}, "prompt: an empty list; give at least one prompt"),
    ({"prompt": 3}, "prompt must be a str or a list of str (got int)"),
    ({"prompt": ["a", "b"], "negative_prompt": ["x"]}, "negative_prompt: 1 text(s) for 2 prompts"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be at least 1 (got 0)"),
    ({"num_inference_steps": 0}, "num_inference_steps must be between 1 and 1000 (got 0)"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number >= 0 (got nan)"),
    ({"guidance_scale": "high"}, "guidance_scale must be a number"),
    ({"seed": -1}, "seed must be >= 0 (got -1)"),
    ({"seed": 1.5}, "seed must be a whole number >= 0"),
    ({"latents": np.zeros((1, 4, 8, 8), np.float32)}, "latents: shape (1, 4, 8, 8), expected (1, 4, 16, 16)"),
    ({"latents": np.zeros((1, 4, 16, 16))}, "latents: dtype float64, expected float32"),
    ({"prompt": ["a", "b"], "latents": np.zeros((3, 4, 16, 16), np.float32)}, "latents: 3 images for 2 prompt(s) x 1 image(s) each; expected 2"),
    ({"output_type": "jpeg"}, "output_type must be one of pil, np, latent"),
    ({"steps": 3}, "unknown argument steps=; the pipeline takes"),
    ({"vae_tile": 4}, "vae_tile"),
    ({"prompt": "koala " * 300}, "unet takes at most 225 (3 chunk(s) of 75"),
    ({"scheduler": "dpm++"}, "unknown scheduler 'dpm++'; known: euler, euler_a, heun, dpmpp_2m, dpmpp_2m_karras, ddim, unipc, lcm"),
], ids=lambda v: None if isinstance(v, str) else "-".join(map(str, v))[:40])
def test_bad_input_is_one_usage_error(pipe, kwargs: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    from koala_trt import KoalaError, UsageError

    kwargs = {"prompt": "a koala", "height": SIZE, "width": SIZE, **kwargs}
    with pytest.raises(UsageError) as info:
        pipe(**kwargs)
    text = str(info.value)
    assert isinstance(info.value, KoalaError) and message in text and "\n" not in text, text
    assert not re.search(r"--(steps|guidance|batch|height|width|seed|latents|vae-tile)\b", text), text  # the caller's keywords


def test_opening_errors(tiny_artifacts: Path, tmp_path: Path) -> None:
    from koala_trt import Pipeline, UsageError

    cases = [(lambda: Pipeline.from_artifacts(tmp_path / "nothing"), "does not exist"),
             (lambda: Pipeline.from_artifacts(tiny_artifacts, backend="cuda"), "unknown backend 'cuda'"),
             (lambda: Pipeline.from_artifacts(tiny_artifacts, backend="tensorrt"), "needs an engines folder"),
             (lambda: Pipeline.from_artifacts(tiny_artifacts, model="random:tiny"), "model= is for backend torch"),
             (lambda: Pipeline.from_artifacts(tiny_artifacts, cpu_precision="bf16"), "cpu_precision= is for backend openvino (not onnxruntime)"),
             (lambda: Pipeline.from_engines(tiny_artifacts), "")]  # not an engines folder (or no TensorRT here): a KoalaError
    from koala_trt import KoalaError

    for make, message in cases:
        with pytest.raises(KoalaError) as info:
            make()
        assert message in str(info.value), str(info.value)
        if message:
            assert isinstance(info.value, UsageError)


def test_import_is_light_and_help_shows_the_api() -> None:
    """`import koala_trt` imports neither numpy nor the sampler (the CLI's --help stays instant);
    help(koala_trt) lists Pipeline, KoalaError and UsageError."""
    code = textwrap.dedent("""
        import pydoc, sys
        import koala_trt
        assert not any(m.split('.')[0] in ('numpy', 'sampler', 'torch') for m in sys.modules), sorted(sys.modules)
        text = pydoc.render_doc(koala_trt, renderer=pydoc.plaintext)
        for name in ('class Pipeline', 'class KoalaError', 'class UsageError', 'from_artifacts', 'num_inference_steps'):
            assert name in text, name
        assert 'torch' not in sys.modules
        print('ok')
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_onnxruntime_pipeline_imports_no_torch(tiny_artifacts: Path, tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from koala_trt import Pipeline
        with Pipeline.from_artifacts({str(tiny_artifacts)!r}, backend="onnxruntime") as pipe:
            image = pipe(["a koala", "a tree"], num_inference_steps=2, height=128, width=128, seed=0).images[1]
        image.save({str(tmp_path / "k.png")!r})
        heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
        print("heavy:", heavy)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "heavy: []", done.stdout
    assert (tmp_path / "k.png").is_file()


def readme_python() -> str:
    """The README's one ```python block."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, f"README.md has {len(blocks)} python blocks; this test runs the one example"
    return blocks[0]


def test_readme_example_runs(tiny_artifacts: Path, tmp_path: Path) -> None:
    """The README's example as written, on random:tiny: only its artifacts folder is this session's
    export."""
    code = readme_python()
    folders = set(re.findall(r'from_artifacts\("([^"]+)"', code))
    assert len(folders) == 1, code
    code = code.replace(f'"{folders.pop()}"', repr(str(tiny_artifacts)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    saved = re.findall(r'\.save\("([^"]+)"\)', code)
    assert saved and all((tmp_path / s).is_file() for s in saved), (saved, list(tmp_path.iterdir()))


def test_torch_backend_builds_the_artifacts_model(pipe, tiny_artifacts: Path) -> None:  # type: ignore[no-untyped-def]
    """backend="torch" without model= builds the model the artifacts were exported from: the same
    image as onnxruntime's up to FP32 kernel differences."""
    from koala_trt import Pipeline
    from validation.images import psnr

    with Pipeline.from_artifacts(tiny_artifacts, backend="torch") as ref:
        ref.set_progress_bar_config(disable=True)
        theirs = ref("a koala", seed=1, output_type="np", **SMALL).images
    mine = pipe("a koala", seed=1, output_type="np", **SMALL).images
    assert psnr(theirs, mine) >= 40
