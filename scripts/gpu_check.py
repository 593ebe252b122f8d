"""The body of scripts/gpu_check.sh (run that): PyTorch FP16 U-Net loops on CUDA, and the numpy
sampler over the torch backend on CUDA against diffusers' pipeline; one table."""

from __future__ import annotations

import gc
import sys
import time

import numpy as np
import torch

STEPS, SIZE, BATCH = 25, 1024, 2  # a 25-step 1024x1024 image with classifier-free guidance (U-Net batch 2)
DEVICE = "cuda"  # `--smoke`: random:tiny at 128 px on the CPU, to try the script without a GPU
SEED_4090 = {"koala-700m": 1.257, "koala-1b": 1.604, "sdxl-base": 3.133}  # seconds, the seed's RTX 4090 table


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def unet_loop(preset: str) -> float:
    """Seconds for STEPS U-Net calls in FP16 at SIZE (after 3 warm-up calls), CUDA-synchronized."""
    from exporter.sources import resolve
    from exporter.specs import specs_from_configs

    src = resolve(f"random:{preset}")
    unet = src.build("unet", device=DEVICE).half()
    spec = specs_from_configs(src.configs)["unet"]
    feeds = {k: torch.from_numpy(v).to(DEVICE) for k, v in spec.dummy_inputs(BATCH, SIZE, SIZE, seed=0).items()}
    feeds = {k: (v.half() if v.is_floating_point() and k != "timestep" else v) for k, v in feeds.items()}
    x = feeds.pop("sample")
    added = {"text_embeds": feeds.pop("text_embeds"), "time_ids": feeds.pop("time_ids")}
    timesteps = torch.linspace(999, 0, STEPS, device=DEVICE)
    with torch.inference_mode():
        for t in timesteps[:3]:
            unet(x, t, feeds["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False)
        sync()
        t0 = time.perf_counter()
        for t in timesteps:
            eps = unet(x, t, feeds["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False)[0]
            x = x - 0.01 * eps  # a scheduler-sized update: the loop stays data-dependent
        sync()
        seconds = time.perf_counter() - t0
    del unet
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return seconds


def sampler_vs_diffusers(preset: str, steps: int = 4) -> tuple[float, float, float]:
    """(PSNR dB, sampler seconds, diffusers seconds): koala-trt's sampler over the torch backend on
    CUDA (what `generate --backend torch` runs) and diffusers' StableDiffusionXLPipeline, FP32, same
    random weights and latents, SIZE x SIZE, `steps` steps."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from exporter.sources import resolve
    from runtime.torch_backend import TorchBackend
    from sampler.loop import PipelineAssets, Request, Sampler, initial_noise
    from validation.images import psnr

    src = resolve(f"random:{preset}")
    sampler = Sampler(TorchBackend(src, device=DEVICE), PipelineAssets.from_source(src))
    plan = sampler.plan(Request("a koala climbing a eucalyptus tree, photo", steps=steps, seed=1, height=SIZE, width=SIZE))
    sampler.sample(plan, progress=False)  # warm-up (cuDNN autotuning, first allocations)
    sync()
    t0 = time.perf_counter()
    images, _ = sampler.sample(plan, progress=False)
    ours = time.perf_counter() - t0
    sampler.backend.close()
    tok1, tok2 = src.tokenizer_dirs()
    pipe = StableDiffusionXLPipeline(vae=src.build("vae", DEVICE), text_encoder=src.build("text_encoder", DEVICE),
                                     text_encoder_2=src.build("text_encoder_2", DEVICE), unet=src.build("unet", DEVICE),
                                     tokenizer=CLIPTokenizer.from_pretrained(str(tok1)), tokenizer_2=CLIPTokenizer.from_pretrained(str(tok2)),
                                     scheduler=EulerDiscreteScheduler.from_config(src.scheduler_config))
    pipe.watermark = None
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(initial_noise(1, 1, plan.noise.shape[1:])).to(DEVICE)
    kw = dict(num_inference_steps=steps, guidance_scale=plan.guidance, height=SIZE, width=SIZE, output_type="np")
    pipe(plan.prompt, latents=latents.clone(), **kw)
    sync()
    t0 = time.perf_counter()
    ref = pipe(plan.prompt, latents=latents.clone(), **kw).images
    theirs = time.perf_counter() - t0
    return psnr(images, ref), ours, theirs


def main() -> int:
    global DEVICE, SIZE
    presets, e2e = ("koala-700m", "koala-1b", "sdxl-base"), "koala-700m"
    if "--smoke" in sys.argv:
        DEVICE, SIZE, presets, e2e = "cpu", 128, ("tiny",), "tiny"
    rows = []
    for preset in presets:
        s = unet_loop(preset)
        ref = f"{SEED_4090[preset]:.3f} s on an RTX 4090" if preset in SEED_4090 else "-"
        rows.append((f"U-Net FP16 loop, {preset}", f"{s:.3f} s", ref))
        print(rows[-1], flush=True)
    db, ours, theirs = sampler_vs_diffusers(e2e)
    ok = db >= 40.0
    rows.append((f"sampler (torch backend, {DEVICE}) vs diffusers, {e2e} FP32 4 steps",
                 f"{db:.1f} dB", f"{ours:.2f} s vs {theirs:.2f} s {'ok' if ok else 'FAIL (< 40 dB)'}"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{torch.cuda.get_device_name(0) if DEVICE == 'cuda' else 'CPU (smoke test)'}, torch {torch.__version__}, {STEPS} steps, {SIZE}x{SIZE}, U-Net batch {BATCH}")
    print(f"{'check':<{width}}  {'measured':>10}  reference")
    for name, got, ref in rows:
        print(f"{name:<{width}}  {got:>10}  {ref}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
