"""img2img (sampler/img2img.py): equal to diffusers' StableDiffusionXLImg2ImgPipeline from the same
components, noise and image on onnxruntime and openvino; preprocessing as diffusers' image processor;
the CLI's refusals, one line each, nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.img_helpers import SIZE, diffusers_image, ours, picture, square_mask

STEPS, STRENGTH = 5, 0.6  # int(5 x 0.6) = 3 steps, from index 2
PSNR_DB = 50.0


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)


@pytest.fixture(scope="module")
def reference(tiny_source, noise: np.ndarray) -> np.ndarray:
    """diffusers' img2img image, fed our noise and the posterior's mean."""
    pipe = tiny_source.pipeline("img2img")
    return diffusers_image(pipe, noise, prompt="a koala", image=picture(), strength=STRENGTH, num_inference_steps=STEPS,
                           guidance_scale=5.0)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_img2img_equals_diffusers(tiny_encoder_artifacts: Path, reference: np.ndarray, noise: np.ndarray, backend: str) -> None:
    from validation.images import psnr

    image = ours(tiny_encoder_artifacts, backend, noise, prompt="a koala", image=picture(), strength=STRENGTH, steps=STEPS,
                 guidance=5.0)
    assert image.shape == reference.shape == (1, SIZE, SIZE, 3)
    assert psnr(reference, image) >= PSNR_DB
    assert psnr(np.asarray(picture(), np.float32)[None] / 255, image) < 30  # it did change the image


@pytest.mark.parametrize("scheduler", ["heun", "dpmpp_2m_karras"])
def test_img2img_with_other_schedulers_equals_diffusers(tiny_source, tiny_encoder_artifacts: Path, noise: np.ndarray,
                                                         scheduler: str) -> None:
    """Heun (order 2: the start index doubles) and DPM++ 2M Karras against diffusers with the same scheduler."""
    import diffusers

    from sampler.schedulers import DIFFUSERS, scheduler_config
    from validation.images import psnr

    pipe = tiny_source.pipeline("img2img")
    pipe.scheduler = getattr(diffusers, DIFFUSERS[scheduler][0]).from_config(scheduler_config(scheduler, tiny_source.scheduler_config))
    ref = diffusers_image(pipe, noise, prompt="a koala", image=picture(), strength=STRENGTH, num_inference_steps=STEPS, guidance_scale=5.0)
    image = ours(tiny_encoder_artifacts, "onnxruntime", noise, prompt="a koala", image=picture(), strength=STRENGTH, steps=STEPS,
                 guidance=5.0, scheduler=scheduler)
    assert psnr(ref, image) >= PSNR_DB


def test_cli_writes_the_samplers_image(tiny_encoder_artifacts: Path, noise: np.ndarray, tmp_path: Path) -> None:
    """generate --image --strength --latents writes what the sampler gives; the noise is --latents'."""
    from PIL import Image

    from sampler.loop import to_uint8

    picture().save(tmp_path / "in.png")
    np.save(tmp_path / "noise.npy", noise)
    code, _, err = run_cli("generate", "-a", tiny_encoder_artifacts, "-p", "a koala", "--image", tmp_path / "in.png",
                           "--strength", STRENGTH, "--steps", STEPS, "--latents", tmp_path / "noise.npy", "-o", tmp_path / "out.png",
                           "--no-progress")
    assert code == 0, err
    assert "img2img from" in err
    want = to_uint8(ours(tiny_encoder_artifacts, "onnxruntime", noise, prompt="a koala", image=picture(), strength=STRENGTH,
                         steps=STEPS, guidance=5.0))[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), want)


def test_preprocessing_equals_diffusers() -> None:
    """Resize (Lanczos, to a multiple of 8 by default), RGB, [-1, 1]; the mask grayscale and binarized."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from sampler.img2img import default_size, preprocess_image, preprocess_mask

    img = picture(100).crop((0, 0, 100, 90))  # 100x90: default 96x88
    h, w = default_size(img, 8)
    assert (h, w) == (88, 96)
    ref = VaeImageProcessor(vae_scale_factor=8).preprocess(img).numpy()
    assert np.array_equal(preprocess_image(img, h, w), ref)
    ref = VaeImageProcessor(vae_scale_factor=8).preprocess(img, height=64, width=128).numpy()
    assert np.allclose(preprocess_image(img, 64, 128), ref, atol=1e-6)
    masks = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    m = square_mask(100)
    for size in ((96, 96), (64, 96)):  # explicit sizes are multiples of 8 (diffusers rounds others down)
        assert np.array_equal(preprocess_mask(m, *size), masks.preprocess(m, height=size[0], width=size[1]).numpy())
    assert torch.is_tensor(masks.preprocess(m))


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "ddim"])
def test_every_scheduler_starts_img2img_as_diffusers(name: str) -> None:
    """The loop starts at the scheduler's begin_index (tests/test_schedulers.py checks it and add_noise
    against diffusers) and noises the image latents there."""
    from exporter.sources import resolve
    from sampler.img2img import ImageConditioning, ImageInputs, preprocess_image
    from sampler.schedulers import make_scheduler

    sched = make_scheduler(name, resolve("random:tiny").scheduler_config)
    sched.set_timesteps(5)
    noise = np.ones((1, 4, 4, 4), np.float32)
    inputs = ImageInputs(preprocess_image(picture(32), 32, 32), None, 0.6)
    cond = ImageConditioning(inputs, noise, sched, 5, True, lambda x: np.zeros((1, 8, 4, 4), np.float32), 0.13025, None, None, 4)
    assert cond.start == 2 * sched.order  # StableDiffusionXLImg2ImgPipeline.get_timesteps: t_start x order
    assert np.array_equal(cond.initial_latents(), sched.add_noise(np.zeros_like(noise), noise, cond.start))


def test_grayscale_and_rgba_images_are_converted() -> None:
    from sampler.img2img import open_image, preprocess_image

    rgb = picture()
    for mode in ("L", "RGBA", "P"):
        x = preprocess_image(open_image(rgb.convert(mode)), SIZE, SIZE)
        assert x.shape == (1, 3, SIZE, SIZE)
    assert np.array_equal(preprocess_image(open_image(rgb.convert("RGBA")), SIZE, SIZE), preprocess_image(rgb, SIZE, SIZE))
    arr = np.asarray(rgb)
    assert np.array_equal(preprocess_image(open_image(arr), SIZE, SIZE), preprocess_image(rgb, SIZE, SIZE))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("img2img-inputs")
    picture().save(d / "in.png")
    square_mask(96).save(d / "mask96.png")
    (d / "not.png").write_text("not an image")
    (d / "trunc.png").write_bytes((d / "in.png").read_bytes()[:400])
    return {p.stem: p for p in d.iterdir()}


@pytest.mark.parametrize("args, line", [
    (["--image", "{not}"], "Error: --image: {not} is not an image; expected a PNG or JPEG"),
    (["--image", "{trunc}"], "Error: --image: {trunc} is unreadable (image file is truncated); expected a PNG or JPEG"),
    (["--image", "{in}", "--mask", "{mask96}"], "Error: --mask is 96x96 px but --image is 128x128 px; give a mask of the image's size"),
    (["--image", "{in}", "--strength", "0"], "Error: --strength must be in (0, 1] (got 0.0)"),
    (["--image", "{in}", "--strength", "1.01"], "Error: --strength must be in (0, 1] (got 1.01)"),
    (["--strength", "0.5"], "Error: --strength needs --image (img2img or inpainting)"),
    (["--mask", "{in}"], "Error: --mask needs --image (img2img or inpainting)"),
    (["--image", "{in}", "--steps", "2"], "Error: --strength 0.3 x --steps 2 leaves no denoising step; raise either (at least 4 steps for this strength)"),
])
def test_bad_input_is_one_line(tiny_encoder_artifacts: Path, files: dict[str, Path], tmp_path: Path, args: list[str], line: str) -> None:
    args = [a.format(**files) for a in args]
    code, out, err = run_cli("generate", "-a", tiny_encoder_artifacts, "-p", "a koala", *args, "-o", tmp_path / "x.png", "--no-progress")
    assert code == 2, err
    assert err.strip().splitlines()[-1] == line.format(**files)
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_artifacts_without_the_encoder(tiny_artifacts: Path, files: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = run_cli("generate", "-a", tiny_artifacts, "-p", "a koala", "--image", files["in"], "-o", tmp_path / "x.png")
    assert code == 2
    assert err.strip().splitlines()[-1].endswith("has no vae_encoder, which --image needs: export it "
                                                 "(koala-trt export --components ... vae_encoder) or build its engine")
    assert not list(tmp_path.iterdir())
