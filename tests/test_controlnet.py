"""ControlNet end to end on CPU: `export --controlnet` (a folder's weights, `random:`, a KOALA-shaped U-Net
without a mid block), the numpy sampler against diffusers' StableDiffusionXLControlNetPipeline from the
same components, noise and control image on onnxruntime and openvino, one-line refusals, FP16 conversion
and TensorRT-RTX engines of the pair, and the residual layout against PyTorch with and without a mid block.

random:tiny is KOALA-shaped (no mid block, one ResNet per down block), so the image test is the
KOALA-700M case; random:tiny-sdxl (mid block, two ResNets per down block) checks the other layout.
The export skips the plain U-Net (a folder with the ControlNet U-Net only runs with a control image),
which keeps the added test time to one tiny U-Net export.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

SIZE, STEPS, PROMPT = 128, 4, "a koala on a branch, line art"


def control_png(path: Path, h: int = 96, w: int = 80) -> Path:
    """A deterministic edge-like picture of another size than the output (it is resized, as diffusers does)."""
    from PIL import Image

    a = np.zeros((h, w, 3), np.uint8)
    a[::7] = 255
    a[:, ::5, 1] = 200
    a[h // 3:2 * h // 3, w // 4:3 * w // 4, 2] = 160
    Image.fromarray(a).save(path)
    return path


@pytest.fixture(scope="module")
def cn_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("controlnet") / "tiny-cn"
    code, _, err = run_cli("export", "--model", "random:tiny", "--controlnet", "random:", "--components",
                           "text_encoder,text_encoder_2,vae_decoder", "--height", SIZE, "--width", SIZE, "--out", out)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return control_png(tmp_path_factory.mktemp("control") / "edges.png")


def test_export_writes_the_pair_with_residual_inputs(cn_artifacts: Path) -> None:
    m = json.loads((cn_artifacts / "manifest.json").read_text())
    assert set(m["components"]) == {"text_encoder", "text_encoder_2", "vae_decoder", "controlnet", "unet_controlnet"}
    assert m["source"]["controlnet"] == "random:" and m["configs"]["controlnet"]["mid_block_type"] is None
    cn, un = m["components"]["controlnet"]["spec"], m["components"]["unet_controlnet"]["spec"]
    assert cn["kind"] == "controlnet" and un["kind"] == "unet"  # the variant is a U-Net to convert, build and plan
    outs = [t["dims"] for t in cn["outputs"]]
    ins = [t["dims"] for t in un["inputs"][5:]]
    assert outs == ins and len(outs) == 7  # conv_in, 1+1, 1+1, 1 down residuals and the mid one
    assert outs[-1] == ["batch", 64, "latent_height/4", "latent_width/4"]
    assert all(m["components"][c]["check"]["passed"] for c in ("controlnet", "unet_controlnet"))


def _reference(source, image, latents: np.ndarray, scale: float, end: float, guidance: float = 5.0) -> np.ndarray:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline
    from transformers import CLIPTokenizer

    tok1, tok2 = source.tokenizer_dirs()
    pipe = StableDiffusionXLControlNetPipeline(
        vae=source.build("vae"), text_encoder=source.build("text_encoder"), text_encoder_2=source.build("text_encoder_2"),
        tokenizer=CLIPTokenizer.from_pretrained(str(tok1)), tokenizer_2=CLIPTokenizer.from_pretrained(str(tok2)),
        unet=source.build("unet"), controlnet=source.build("controlnet"),
        scheduler=EulerDiscreteScheduler.from_config(source.scheduler_config), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, image=image, num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE, width=SIZE,
                latents=torch.from_numpy(latents.copy()), controlnet_conditioning_scale=scale, control_guidance_end=end,
                output_type="np").images


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_image_equals_diffusers_controlnet_pipeline(cn_artifacts: Path, control: Path, backend: str, tmp_path: Path) -> None:
    """Same components, noise and control image: the image diffusers gives (>= 50 dB), far from the run
    without a control image (diffusers' plain pipeline, which the sampler matches: test_sampler.py)."""
    import torch
    from PIL import Image

    from exporter.manifest import load_manifest
    from exporter.sources import resolve_recorded
    from sampler.loop import PipelineAssets, Request, Sampler, initial_noise
    from validation.images import psnr

    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed")
    m = load_manifest(cn_artifacts)
    if backend == "openvino":
        from runtime.openvino_backend import OpenVinoBackend

        runtime = OpenVinoBackend(m, threads=2, cpu_precision="fp32", cache_dir=tmp_path / "cache")
    else:
        from runtime.backend import OnnxRuntimeBackend

        runtime = OnnxRuntimeBackend(m)
    sampler = Sampler(runtime, PipelineAssets.from_manifest(m))
    latents = initial_noise(3, 1, (4, SIZE // 8, SIZE // 8))
    # 4 steps with end 0.7: the ControlNet acts in steps 0-1 and not in 2-3 (diffusers' controlnet_keep).
    plan = sampler.plan(Request(PROMPT, steps=STEPS, guidance=5.0, latents=latents, control_image=control.read_bytes(),
                                controlnet_conditioning_scale=0.8, control_guidance_end=0.7))
    ours, timings = sampler.sample(plan, progress=False)
    assert len(timings.stages["controlnet"]) == 2 and len(timings.stages["unet"]) == STEPS
    source = resolve_recorded(m.view.source.model, m.view.source.controlnet)
    ref = _reference(source, Image.open(control), latents, 0.8, 0.7)
    assert psnr(ref, ours) >= 50.0, psnr(ref, ours)
    plain = source.pipeline()
    plain.watermark = None
    plain.set_progress_bar_config(disable=True)
    without = plain(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE,
                    latents=torch.from_numpy(latents.copy()), output_type="np").images
    assert psnr(without, ours) < 35.0, psnr(without, ours)  # the control image changes the image


def test_residual_layout_matches_pytorch_with_and_without_mid_block() -> None:
    """The specs' residual shapes are what diffusers' ControlNetModel returns, and the U-Net takes them,
    for a KOALA-shaped U-Net without a mid block (which ControlNetModel.from_unet refuses) and an SDXL-shaped one."""
    import torch

    from exporter.sources import resolve, with_controlnet
    from exporter.specs import specs_from_configs

    for preset in ("random:tiny", "random:tiny-sdxl"):
        source = with_controlnet(resolve(preset), "random:")
        specs = specs_from_configs(source.configs)
        cn, unet = source.build("controlnet"), source.build("unet")
        assert (cn.mid_block is None) == (source.configs["unet"].get("mid_block_type") is None)
        feeds = specs["controlnet"].dummy_inputs(2, 64, 96)
        with torch.no_grad():
            down, mid = cn(torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]),
                           torch.from_numpy(feeds["encoder_hidden_states"]), torch.from_numpy(feeds["controlnet_cond"]),
                           added_cond_kwargs={"text_embeds": torch.from_numpy(feeds["text_embeds"]),
                                              "time_ids": torch.from_numpy(feeds["time_ids"])}, return_dict=False)
            out = unet(torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]),
                       torch.from_numpy(feeds["encoder_hidden_states"]),
                       added_cond_kwargs={"text_embeds": torch.from_numpy(feeds["text_embeds"]),
                                          "time_ids": torch.from_numpy(feeds["time_ids"])},
                       down_block_additional_residuals=list(down), mid_block_additional_residual=mid, return_dict=False)[0]
        want = specs["controlnet"].output_shapes(2, 64, 96)
        assert [tuple(t.shape) for t in (*down, mid)] == list(want.values()), preset
        assert list(want.values()) == list(specs["unet_controlnet"].input_shapes(2, 64, 96).values())[5:]
        assert tuple(out.shape) == (2, 4, 8, 12) and float(mid.abs().mean()) > 0  # the random zero convolutions act


def test_a_saved_controlnet_folder_loads_as_saved(tmp_path: Path) -> None:
    """The real loading path: a ControlNetModel folder (config + safetensors), here one without a mid block."""
    import torch

    from exporter.sources import resolve, with_controlnet

    made = with_controlnet(resolve("random:tiny"), "random:").build("controlnet")
    made.save_pretrained(str(tmp_path / "cn"))
    loaded = with_controlnet(resolve("random:tiny"), str(tmp_path / "cn"))
    assert loaded.controlnet == str((tmp_path / "cn").resolve())
    again = loaded.build("controlnet")
    a, b = made.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refusals_are_one_line(cn_artifacts: Path, control: Path, tiny_artifacts: Path, tmp_path: Path) -> None:
    from exporter.controlnet import config_from_unet
    from exporter.sources import resolve

    # A ControlNet made for another U-Net: found from the configs at export, before any weight is read.
    other = tmp_path / "other-cn"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config_from_unet(resolve("random:tiny-sdxl").configs["unet"])))
    code, _, err = run_cli("export", "--model", "random:tiny", "--controlnet", other, "--out", tmp_path / "x")
    assert code == 2 and "does not fit the U-Net: down residual 2 (down block 0 resnet 1)" in err, err
    assert not (tmp_path / "x").exists()
    code, _, err = run_cli("export", "--model", "random:tiny", "--components", "controlnet", "--out", tmp_path / "x")
    assert code == 2 and "--controlnet" in err.strip().splitlines()[-1]
    out = tmp_path / "o.png"
    base = ("generate", "--prompt", "k", "--steps", "2", "--height", SIZE, "--width", SIZE, "--out", out, "--no-progress")
    (tmp_path / "cut.png").write_bytes(control.read_bytes()[:150])
    (tmp_path / "text.png").write_text("not an image")
    cases = [
        (("--artifacts", tiny_artifacts, "--control-image", control), "a control image needs a ControlNet"),
        (("--artifacts", cn_artifacts, "--control-image", tmp_path / "cut.png"), "not a readable image"),
        (("--artifacts", cn_artifacts, "--control-image", tmp_path / "text.png"), "not a readable image"),
        (("--artifacts", cn_artifacts, "--control-image", tmp_path / "none.png"), "no such file"),
        (("--artifacts", cn_artifacts, "--control-image", control, "--control-guidance-start", "0.6", "--control-guidance-end", "0.5"),
         "0 <= start < end <= 1"),
        (("--artifacts", cn_artifacts, "--controlnet-scale", "0.5"), "need --control-image"),
        (("--artifacts", cn_artifacts), "holds the ControlNet U-Net only"),
    ]
    for args, line in cases:
        code, _, err = run_cli(*base, *args)
        lines = err.strip().splitlines()
        assert code == 2 and line in lines[-1] and "Traceback" not in err, (args, err)
        assert not out.exists()


def test_generate_with_a_control_image(cn_artifacts: Path, control: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "cn.png"
    code, stdout, err = run_cli("generate", "--artifacts", cn_artifacts, "--prompt", PROMPT, "--seed", "5", "--steps", "3",
                                "--height", SIZE, "--width", SIZE, "--control-image", control, "--controlnet-scale", "0.8",
                                "--control-guidance-start", "0.2", "--out", out, "--no-progress", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["control_image"] == str(control) and doc["timings"]["stages"]["controlnet"]["calls"] == 2  # steps 1 and 2 of 0-2
    img = Image.open(out)
    assert img.size == (SIZE, SIZE) and img.text["controlnet_conditioning_scale"] == "0.8"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="TensorRT-RTX is not installed (make install installs it)")
def test_fp16_pair_and_tensorrt_rtx_engines_for_rtx3060ti(cn_artifacts: Path, tmp_path: Path) -> None:
    """convert makes the pair FP16 (U-Net policy); the RTX 3060 Ti profile builds both engines without a GPU,
    and its dry run counts them in the memory plan."""
    fp16 = tmp_path / "fp16"
    code, _, err = run_cli("convert", "--onnx", cn_artifacts, "--out", fp16, "--no-accuracy", "-c", "controlnet,unet_controlnet")
    assert code == 0, err
    m = json.loads((fp16 / "manifest.json").read_text())
    assert {c: v["precision"] for c, v in m["components"].items() if c in ("controlnet", "unet_controlnet")} == \
        {"controlnet": "fp16", "unet_controlnet": "fp16"}
    args = ("build", "--profile", "rtx3060ti", "--onnx", cn_artifacts, "--onnx", fp16, "--height", SIZE, "--width", SIZE,
            "--batch", "1", "-c", "controlnet,unet_controlnet")
    code, stdout, err = run_cli(*args, "--out", tmp_path / "plan", "--dry-run")
    assert code == 0, err
    assert "controlnet.fp16.b2.128x128.sm86" in stdout and "memory (resident)" in stdout
    r = subprocess.run([sys.executable, "-c", "import sys; from koala_trt.cli import main; sys.exit(main(sys.argv[1:]))",
                        *map(str, args), "--no-estimate", "--out", tmp_path / "eng"],
                       capture_output=True, text=True, env={**os.environ, "POLYGRAPHY_USE_TENSORRT_RTX": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    e = json.loads((tmp_path / "eng" / "manifest.json").read_text())["engines"]
    assert {c: v["precision"] for c, v in e.items()} == {"controlnet": "fp16", "unet_controlnet": "fp16"}
    for v in e.values():
        assert (tmp_path / "eng" / v["file"]).read_bytes()[:4] == b"vtrt"
    res = e["unet_controlnet"]["inputs"]["mid_block_additional_residual"]
    assert res["min"] == res["max"] == [2, 64, 4, 4]


def test_served_image_equals_generate(cn_artifacts: Path, control: Path, tmp_path: Path) -> None:
    """`koala-trt serve` over the ControlNet folder: control_image as a PNG file's bytes (UINT8 [1, 1, N]) and
    as pixels (UINT8 [H, W, 3]) give generate's image; a cut-short PNG is HTTP 400 and the server keeps serving."""
    pytest.importorskip("tritonclient")
    from PIL import Image
    from test_serve import SERVE_ENV, http_client, inputs, running_serve
    from tritonclient.utils import InferenceServerException

    if importlib.util.find_spec("pytriton") is None or not (SERVE_ENV / "bin" / "python").is_file():
        pytest.skip("needs nvidia-pytriton and .venv-serve (make install)")
    import tritonclient.http as th

    out = tmp_path / "g.png"
    code, _, err = run_cli("generate", "--artifacts", cn_artifacts, "--prompt", PROMPT, "--seed", "7", "--steps", "3",
                           "--height", SIZE, "--width", SIZE, "--control-image", control, "--controlnet-scale", "0.7",
                           "--out", out, "--no-progress")
    assert code == 0, err
    expected = np.asarray(Image.open(out).convert("RGB"))
    png = np.frombuffer(control.read_bytes(), np.uint8).reshape(1, 1, -1)
    pixels = np.asarray(Image.open(control).convert("RGB"))

    def req(image: np.ndarray) -> dict:
        return {"prompt": (np.array([PROMPT.encode()], dtype=np.object_), "BYTES"), "seed": (np.array([7], np.int64), "INT64"),
                "steps": (np.array([3], np.int32), "INT32"), "height": (np.array([SIZE], np.int32), "INT32"),
                "width": (np.array([SIZE], np.int32), "INT32"), "controlnet_scale": (np.array([0.7], np.float32), "FP32"),
                "control_image": (image, "UINT8")}

    with running_serve(["--artifacts", str(cn_artifacts)], tmp_path / "server.log") as server, http_client(server) as client:
        for image in (png, pixels):
            got = client.infer("koala", inputs(th, **req(image))).as_numpy("image")
            assert np.array_equal(got, expected)
        with pytest.raises(InferenceServerException) as e:
            client.infer("koala", inputs(th, **req(png[:, :, :150])))
        assert e.value.status() == "400" and "not a readable image" in e.value.message()
        assert client.is_server_ready()


def test_bench_times_the_controlnet_step_alone(cn_artifacts: Path) -> None:
    """`bench -c controlnet,unet_controlnet`: a ControlNet step's two networks, each at the CFG batch,
    on an export without the plain unet (no end-to-end loop)."""
    code, out, err = run_cli("bench", "-a", cn_artifacts, "-c", "controlnet,unet_controlnet", "--no-end-to-end",
                             "--height", SIZE, "--width", SIZE, "--warmup", "0", "--runs", "1", "--json", "--no-progress")
    assert code == 0, err
    comps = json.loads(out)["components"]
    assert set(comps) == {"controlnet", "unet_controlnet"}
    assert all(c["batch"] == 2 and c["median"] > 0 for c in comps.values())
