"""`koala-trt calibrate`: run the PyTorch reference pipeline over prompts and record the U-Net's
inputs at every denoising step (the classifier-free-guidance batch: negative and positive halves,
as the engine sees it), one shard per prompt.

Resumable: shards already recorded (and intact) are kept, so re-running the same command after an
interruption records only what is missing. Each prompt has its own seed (seed + prompt index), so a
resumed set is identical to one recorded in one go.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from calibration.dataset import CalibrationSet, load_calibration, shard_name
from calibration.manifest import CALIB_FORMAT, CALIB_MANIFEST, FORMAT_VERSION
from exporter.manifest import sha256_file
from exporter.sources import ModelSource
from koala_core.atomic import check_writable_parent, staged_file
from koala_core.errors import KoalaError, UsageError
from koala_core.meter import Meter

Log = Callable[[str], None]

# NVIDIA's SDXL INT8 recipe calibrates on 32-64 prompts over 20-30 denoising steps.
DEFAULT_NUM = 32
DEFAULT_STEPS = 20


@dataclass
class CaptureOptions:
    prompts: list[str]
    steps: int = DEFAULT_STEPS
    height: int = 1024
    width: int = 1024
    guidance: float = 5.0
    seed: int = 0
    force: bool = False


def _settings(source: ModelSource, opts: CaptureOptions) -> dict[str, Any]:
    sha = source.config_sha256()
    return {"model": source.ref, "config_sha256": {k: sha[k] for k in ("unet", "text_encoder", "text_encoder_2", "scheduler")},
            "height": opts.height, "width": opts.width, "steps": opts.steps, "guidance": opts.guidance,
            "seed": opts.seed, "prompts": list(opts.prompts)}


def _validate(source: ModelSource, opts: CaptureOptions) -> None:
    from exporter.specs import specs_from_configs

    if opts.steps < 1:
        raise UsageError("--steps must be at least 1")
    if not opts.prompts:
        raise UsageError("no prompts to calibrate on")
    if opts.guidance <= 1.0:
        raise UsageError(f"--guidance {opts.guidance} turns classifier-free guidance off; the engine sees CFG batches (use > 1)")
    specs_from_configs(source.configs)["unet"].check_size(opts.height, opts.width)


def _open_set(out: Path, settings: dict[str, Any], force: bool, log: Log) -> CalibrationSet:
    """The set at `out` to resume, or a new empty one; settings must match to resume."""
    if out.exists() and force:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if out.exists():
        if not (out / CALIB_MANIFEST).is_file():
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            else:
                raise UsageError(f"{out} exists and is not a calibration set; choose another --out or pass --force")
    if out.exists():
        cs = load_calibration(out, require_complete=False)
        old = cs.settings
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise UsageError(f"{out} holds a calibration set recorded with different settings ({', '.join(diff)}); "
                             "pass --force to replace it, or choose another --out")
        kept = []
        for doc, entry in zip(cs.shards, cs.view.shards):
            p = out / entry.file
            if p.is_file() and p.stat().st_size == entry.bytes and sha256_file(p) == entry.sha256:
                kept.append(doc)
            else:
                log(f"shard {entry.file} is missing or corrupt: recording it again")
        cs.data["shards"] = kept
        if kept:
            log(f"resuming {out}: {len(kept)}/{len(settings['prompts'])} prompts already recorded")
        return cs
    check_writable_parent(out)
    out.mkdir(parents=True)
    cs = CalibrationSet(out, {"format": CALIB_FORMAT, "format_version": FORMAT_VERSION, "settings": settings, "shards": []})
    cs.save()
    return cs


class UNetRecorder:
    """A forward pre-hook on the pipeline's U-Net that keeps each call's inputs as numpy, named as
    the U-Net spec names them (timestep broadcast to the batch, as the engine takes it)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, np.ndarray]] = []

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        added = kwargs["added_cond_kwargs"]
        batch = sample.shape[0]
        t = torch.as_tensor(timestep).reshape(-1).to(torch.float32).expand(batch)
        self.calls.append({
            "sample": sample.detach().float().numpy().copy(),
            "timestep": t.numpy().copy(),
            "encoder_hidden_states": kwargs["encoder_hidden_states"].detach().float().numpy().copy(),
            "text_embeds": added["text_embeds"].detach().float().numpy().copy(),
            "time_ids": added["time_ids"].detach().float().numpy().copy(),
        })


def _to_shard(calls: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    shard = {k: np.stack([c[k] for c in calls]) for k in ("sample", "timestep")}
    for k in ("encoder_hidden_states", "text_embeds", "time_ids"):
        first = calls[0][k]
        if any(not np.array_equal(first, c[k]) for c in calls[1:]):  # the pipeline never changes them
            raise KoalaError(f"U-Net input {k} changed between denoising steps; cannot store it once per shard")
        shard[k] = first
    return shard


def capture(source: ModelSource, out: Path, opts: CaptureOptions, log: Log = print) -> CalibrationSet:
    """Record (or finish recording) the calibration set at `out`."""
    _validate(source, opts)
    settings = _settings(source, opts)
    cs = _open_set(Path(out), settings, opts.force, log)
    done = {e.prompt_index for e in cs.view.shards}
    todo = [i for i in range(len(opts.prompts)) if i not in done]
    if not todo:
        log(f"{out}: all {len(opts.prompts)} prompts already recorded")
        return cs

    import torch
    from tqdm import tqdm

    from koala_core.run_settings import progress_disabled

    from calibration.prompt_embeds import pipeline_embeds

    with Meter() as m:
        pipe = source.pipeline()
    pipe.set_progress_bar_config(disable=True)
    log(f"loaded the PyTorch reference pipeline in {m.seconds:.1f} s")
    recorder = UNetRecorder()
    handle = pipe.unet.register_forward_pre_hook(recorder, with_kwargs=True)
    bar = tqdm(total=len(todo) * opts.steps, unit="step", desc="calibrate", file=sys.stderr, dynamic_ncols=True,
               disable=progress_disabled(), mininterval=1.0)
    try:
        for i in todo:
            recorder.calls.clear()
            started = time.perf_counter()
            with torch.no_grad():
                # Chunked as the sampler encodes a prompt over 75 tokens (diffusers alone would cut it at 77).
                pipe(**pipeline_embeds(pipe, opts.prompts[i]), height=opts.height, width=opts.width, num_inference_steps=opts.steps,
                     guidance_scale=opts.guidance, generator=torch.Generator().manual_seed(opts.seed + i),
                     output_type="latent", callback_on_step_end=lambda p, s, t, kw: (bar.update(1), kw)[1])
            shard = _to_shard(recorder.calls)
            name = shard_name(i)
            with staged_file(cs.root / name) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **shard)
            path = cs.root / name
            cs.shards.append({
                "file": name, "prompt_index": i, "prompt": opts.prompts[i], "seed": opts.seed + i,
                "timesteps": [float(t[0]) for t in shard["timestep"]],
                "shapes": {k: list(v.shape) for k, v in shard.items()},
                "sha256": sha256_file(path), "bytes": path.stat().st_size,
                "seconds": round(time.perf_counter() - started, 2),
            })
            cs.shards.sort(key=lambda e: e["prompt_index"])
            cs.save()  # after every shard: an interruption loses at most the prompt in flight
    finally:
        bar.close()
        handle.remove()
    return cs
