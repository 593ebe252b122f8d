"""The Python API: a text-to-image pipeline object in diffusers' shape over any backend.

    from koala_trt import Pipeline

    with Pipeline.from_artifacts("out/artifacts", backend="openvino") as pipe:
        image = pipe("a koala in a eucalyptus tree", negative_prompt="blurry", num_inference_steps=25,
                     guidance_scale=5.0, height=1024, width=1024, seed=0).images[0]
    image.save("koala.png")

Every request goes one way, whoever makes it (this API, `koala-trt generate`, the Triton model of
`koala-trt serve`, `koala-trt bench`): keywords -> sampler.loop.Request (Pipeline.requests, the one
place that maps diffusers' names to the sampler's) -> sampler.loop.Plan (Pipeline.plan: every input
checked, the initial noise drawn) -> images (Pipeline.run). numpy only: for onnxruntime, openvino and
tensorrt neither torch nor diffusers is imported.
"""

from __future__ import annotations

import dataclasses
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from koala_core.errors import KoalaError, UsageError
from sampler.loop import Plan, PipelineAssets, Request, Sampler, Timings, to_uint8

# diffusers' keyword -> sampler.loop.Request's field, where the two differ; every other keyword is a
# Request field of the same name (negative_prompt, height, width, latents, seed, scheduler, vae_tile,
# and the inputs features add: image, mask_image, strength, control_image, ...).
RENAMED = {"num_inference_steps": "steps", "guidance_scale": "guidance", "num_images_per_prompt": "batch"}
# The CLI's option in the sampler's one-line errors -> the keyword a Python caller passed.
_OPTION_NAMES = {"--steps": "num_inference_steps", "--guidance": "guidance_scale", "--batch": "num_images_per_prompt",
                 "--mask": "mask_image", "--cache-interval": "cache_interval", "--cache-branch": "cache_branch",
                 "--control-image": "control_image", "--controlnet-scale": "controlnet_conditioning_scale",
                 "--control-guidance-start": "control_guidance_start", "--control-guidance-end": "control_guidance_end"}
OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class PipelineOutput:
    """What a Pipeline call returns.

    images: one per prompt x num_images_per_prompt, prompt by prompt: PIL images (output_type "pil"),
        else a float32 array [n, height, width, 3] in [0, 1] ("np") or the final latents [n, 4, h/8,
        w/8] ("latent"), as diffusers' output_type gives them. A model with random weights (random:tiny,
        random:koala-700m) draws coloured noise: the pipeline is right, the weights know no pictures.
    timings: seconds per stage of the run (tokenize, each network, step, postprocess, sample), all
        prompts together; `timings.summary()` gives the table `koala-trt generate` prints.
    plans: each prompt's resolved settings (steps, guidance, seed, height, width, images, noise).
    """

    images: Any
    timings: Timings
    plans: list[Plan]


class Pipeline:
    """KOALA / SDXL text to image with the numpy sampler (tokenize, encode, denoise with
    classifier-free guidance, VAE decode) over onnxruntime, openvino, tensorrt or torch.

    Open one with `Pipeline.from_artifacts(folder, backend=...)` (a `koala-trt export` folder) or
    `Pipeline.from_engines(folder)` (a `koala-trt build` folder); call it with diffusers' arguments;
    `close()` it (or use `with`) to free the backend. Bad input raises koala_trt.UsageError (a
    KoalaError) with one line saying what to change, before any network runs."""

    def __init__(self, backend: Any, assets: PipelineAssets, *, opened: Any = None,
                 warn: Callable[[str], None] | None = None) -> None:
        """Over an opened runtime backend (runtime.Backend or anything with its run/specs interface)
        and the sampler's assets; `opened` is the sampler.pipeline.OpenedPipeline they came from, if
        any (closed with this). Most callers want from_artifacts / from_engines instead."""
        self.backend, self.assets, self.opened = backend, assets, opened
        self.sampler = Sampler(backend, assets)
        self.progress = True
        self.load_seconds: float | None = None  # how long load() took, once it has run
        self._warn = warn

    # ----- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, backend: str = "onnxruntime", *, artifacts: str | Path | None = None, engines: str | Path | None = None,
             model: str | None = None, threads: int | None = None, cpu_precision: str | None = None, verify: bool = True,
             log: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None) -> "Pipeline":
        """The general opener (from_artifacts and from_engines call it): `backend` over an artifacts
        folder (onnxruntime, openvino; tokenizers and defaults for the others), an engines folder
        (tensorrt) or a model (torch: hub id, diffusers folder or random:<preset>; without one, the
        artifacts' source model). The artifacts' files are checked (verify=False: sizes only, not
        sha256) and the backend opened; the networks load on the first call (or load())."""
        from runtime.backend import BACKENDS
        from sampler.pipeline import open_pipeline

        if backend not in BACKENDS:
            raise UsageError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if backend in ("onnxruntime", "openvino") and artifacts is None:
            raise UsageError(f"backend {backend} needs an artifacts folder (from `koala-trt export`)")
        if backend == "tensorrt" and engines is None:
            raise UsageError("backend tensorrt needs an engines folder (from `koala-trt build`): Pipeline.from_engines(folder)")
        if backend == "torch" and model is None and artifacts is None:
            raise UsageError("backend torch needs model= (hub id, folder or random:<preset>) or an artifacts folder")
        if cpu_precision is not None and backend != "openvino":
            raise UsageError(f"cpu_precision= is for backend openvino (not {backend})")
        if model is not None and backend != "torch":
            raise UsageError(f"model= is for backend torch; {backend} reads the artifacts / engines folder")
        for name, folder in (("artifacts", artifacts), ("engines", engines)):
            if folder is not None and not Path(folder).is_dir():
                raise UsageError(f"{name} folder {folder} does not exist")
        opened = open_pipeline(backend, artifacts=None if artifacts is None else Path(artifacts),
                               engines=None if engines is None else Path(engines), model=model, threads=threads,
                               cpu_precision=cpu_precision, full_hash=verify, model_from_artifacts=True, log=log)
        return cls.from_opened(opened, warn=warn)

    @classmethod
    def from_opened(cls, opened: Any, warn: Callable[[str], None] | None = None) -> "Pipeline":
        """Over a sampler.pipeline.OpenedPipeline (open_pipeline's result); closes it if the sampler
        cannot use its backend."""
        try:
            return cls(opened.backend, opened.assets, opened=opened, warn=warn)
        except BaseException:
            opened.close()
            raise

    @classmethod
    def from_artifacts(cls, artifacts: str | Path, backend: str = "onnxruntime", **options: Any) -> "Pipeline":
        """A pipeline over a `koala-trt export` folder: backend "onnxruntime" (default), "openvino"
        (options: threads, cpu_precision "auto"/"fp32"/"bf16"), "torch" (the artifacts' source model,
        or model=) or "tensorrt" (engines= a `koala-trt build` folder; the artifacts give tokenizers
        and defaults). Other options: verify=False checks file sizes only (faster start for big
        models); log=callable gets progress lines. See Pipeline.open."""
        return cls.open(backend, artifacts=artifacts, **options)

    @classmethod
    def from_engines(cls, engines: str | Path, artifacts: str | Path | None = None, **options: Any) -> "Pipeline":
        """A TensorRT pipeline over a `koala-trt build` folder (it carries the tokenizers, scheduler
        config and defaults; `artifacts` is needed only for engines built without them)."""
        return cls.open("tensorrt", engines=engines, artifacts=artifacts, **options)

    # ----- one request ----------------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, latents: np.ndarray | None = None,
                 num_images_per_prompt: int | None = 1, seed: int = 0, scheduler: str | None = None,
                 output_type: str = "pil", vae_tile: int | None = None, **inputs: Any) -> PipelineOutput:
        """Generate images, as diffusers' StableDiffusionXLPipeline.__call__ does.

        prompt: a text, or a list of texts (num_images_per_prompt images each, prompt by prompt).
        negative_prompt: what to steer away from: one text for all prompts or one per prompt
            [default: none; zero embeddings, SDXL's force_zeros_for_empty_prompt].
        num_inference_steps, guidance_scale, height, width: None takes the model's defaults
            (the artifacts' "sampler" entry: 25 steps and 5.0 for KOALA, 10 and 3.5 for Lightning;
            its native size); guidance_scale <= 1 turns classifier-free guidance off.
        latents: the initial noise, float32 [images, 4, height/8, width/8], as diffusers' `latents=`
            takes it (before scaling by the initial sigma); it replaces `seed`.
        num_images_per_prompt: images per prompt (None: as many as `latents` holds per prompt).
        seed: image n of the call starts from numpy PCG64 noise seeded with seed + n (not torch's
            generator: pass diffusers' noise as `latents` to compare with it).
        scheduler: a scheduler name (sampler.schedulers) [default: the model's own config].
        output_type: "pil" (default), "np" or "latent", as in diffusers.
        vae_tile: decode in tiles of this many pixels [default: the VAE engine's own, else untiled].
        inputs: further per-request inputs by their diffusers names (any field of
            sampler.loop.Request that a feature adds).

        Random-weight models (random:tiny) draw coloured noise. Raises UsageError (one line) for bad
        input before any network runs."""
        if output_type not in OUTPUT_TYPES:
            raise UsageError(f"output_type must be one of {', '.join(OUTPUT_TYPES)} (got {output_type!r})")
        try:
            plans = self.plan(self.requests(prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                                            guidance_scale=guidance_scale, height=height, width=width, latents=latents,
                                            num_images_per_prompt=num_images_per_prompt, seed=seed, scheduler=scheduler,
                                            vae_tile=vae_tile, **inputs))
        except UsageError as e:  # the sampler speaks the CLI's options; say the caller's keywords
            raise UsageError(python_names(str(e))) from None
        self.load()
        return self.run(plans, output_type=output_type)

    def requests(self, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 num_images_per_prompt: int | None = 1, latents: Any = None, seed: int = 0,
                 **options: Any) -> list[Request]:
        """One sampler.loop.Request per prompt from diffusers' keywords: the one place that maps them
        (RENAMED; any other keyword is the Request field of that name). Prompt j's images start at
        seed + j x num_images_per_prompt, and take their slice of `latents`."""
        prompts = _texts("prompt", prompt)
        if not prompts:
            raise UsageError("prompt: an empty list; give at least one prompt")
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = _texts("negative_prompt", negative_prompt)
            if len(negatives) != len(prompts):
                raise UsageError(f"negative_prompt: {len(negatives)} text(s) for {len(prompts)} prompts; "
                                 "give one text, or one per prompt")
        per = None if num_images_per_prompt is None else _whole("num_images_per_prompt", num_images_per_prompt)
        if per is not None and per < 1:
            raise UsageError(f"--batch must be at least 1 (got {per})")  # as the sampler says it: callers translate
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise UsageError(f"seed must be a whole number >= 0 (got {seed!r})")
        _check_scheduler(options.get("scheduler"))
        fields = {f.name for f in dataclasses.fields(Request)} - {"prompt", "negative_prompt", "batch", "latents", "seed"}
        known = sorted({k for k in RENAMED if RENAMED[k] in fields} | {f for f in fields if f not in RENAMED.values()})
        values: dict[str, Any] = {}
        for key, value in options.items():
            name = RENAMED.get(key, key)
            if name not in fields or key in RENAMED.values():
                raise UsageError(f"unknown argument {key}=; the pipeline takes prompt, negative_prompt, latents, "
                                 f"num_images_per_prompt, seed, {', '.join(known)}")
            if value is not None and name in ("steps", "height", "width", "vae_tile"):
                value = _whole(key, value)
            elif value is not None and name == "guidance":
                value = _number(key, value)
            values[name] = value
        slices = _split_latents(latents, len(prompts), per)
        if slices is not None and per is None:
            per = slices[0].shape[0]
        return [Request(prompt=p, negative_prompt=n, batch=per, seed=int(seed) + j * (per or 1),
                        latents=None if slices is None else slices[j], **values)
                for j, (p, n) in enumerate(zip(prompts, negatives))]

    def plan(self, requests: Request | Sequence[Request]) -> list[Plan]:
        """Check every request (sizes, steps, guidance, prompt length against the backend's ranges,
        latents) and draw its noise; UsageError in the CLI's words before anything runs."""
        return [self.sampler.plan(r) for r in ([requests] if isinstance(requests, Request) else requests)]

    def load(self, plans: Sequence[Plan] = ()) -> float:
        """Open every network now (else the first call does): those `plans` run (Sampler.components: the
        U-Net pair where they cache features, the VAE encoder where they start from an image; no plans:
        the text-to-image ones); the seconds it took (once)."""
        if self.load_seconds is None:
            t0 = time.perf_counter()
            load = getattr(self.backend, "load", None)
            if load is not None:
                load(list(dict.fromkeys(c for p in (plans or [None]) for c in self.sampler.components(p))))
            self.load_seconds = time.perf_counter() - t0
        return self.load_seconds

    def run(self, plans: Sequence[Plan], output_type: str = "pil", progress: bool | None = None) -> PipelineOutput:
        """Run planned requests one after another; their images in order and their timings together."""
        if output_type not in OUTPUT_TYPES:
            raise UsageError(f"output_type must be one of {', '.join(OUTPUT_TYPES)} (got {output_type!r})")
        show = self.progress if progress is None else progress
        timings, outs = Timings(), []
        for plan in plans:
            out, t = self.sampler.sample(plan, progress=show, warn=self._warn_line, decode=output_type != "latent")
            outs.append(out)
            for stage, seconds in t.stages.items():
                timings.stages.setdefault(stage, []).extend(seconds)
        arrays = np.concatenate(outs) if len(outs) > 1 else outs[0]
        if output_type != "pil":
            return PipelineOutput(arrays, timings, list(plans))
        from PIL import Image

        return PipelineOutput([Image.fromarray(a) for a in to_uint8(arrays)], timings, list(plans))

    def set_progress_bar_config(self, disable: bool = False, **_: Any) -> None:
        """diffusers' switch for the denoising progress bar (disable=True: none)."""
        self.progress = not disable

    def _warn_line(self, message: str) -> None:
        if self._warn is not None:
            self._warn(message)
        else:
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # ----- closing --------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the backend's sessions / engines."""
        (self.opened or self.backend).close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        a = self.assets
        return (f"Pipeline({getattr(self.backend, 'name', '?')}, {a.origin or '?'}: {a.width}x{a.height}, "
                f"{a.steps} steps, guidance {a.guidance:g})")


def python_names(message: str) -> str:
    """A sampler error in the caller's keywords: `--steps` -> num_inference_steps, `--height` -> height,
    `--mask-image` -> mask_image (a request option: a field of Request); other options stay as they are."""
    fields = {f.name for f in dataclasses.fields(Request)}

    def name(m: re.Match[str]) -> str:
        key = m.group(1).replace("-", "_")
        return _OPTION_NAMES.get(m.group(0), key if key in fields else m.group(0))

    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)", name, message)


def _check_scheduler(name: Any) -> None:
    """A scheduler name of sampler.schedulers.SCHEDULERS (None: the model's own), before anything else
    is read: UsageError in one line listing the known ones."""
    if name is not None:
        from sampler.schedulers import check_name

        check_name(name)


def _texts(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UsageError(f"{name} must be a str or a list of str (got {type(value).__name__})")


def _whole(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        raise UsageError(f"{name} must be a whole number (got {value!r})")
    return int(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UsageError(f"{name} must be a number (got {value!r})")
    return float(value)


def _split_latents(latents: Any, prompts: int, per: int | None) -> list[np.ndarray] | None:
    """`latents` for `prompts` prompts, per prompt (diffusers takes them as one batch)."""
    if latents is None:
        return None
    try:
        lat = latents if isinstance(latents, np.ndarray) else np.asarray(latents)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"latents: not an array ({' '.join(str(e).split())[:120]})") from None
    if prompts == 1:  # the sampler checks its shape, dtype and values
        return [lat]
    if lat.ndim != 4:
        raise UsageError(f"latents: shape {tuple(lat.shape)}, expected 4 dimensions (images, channels, height/8, width/8)")
    n = lat.shape[0]
    want = prompts * (per if per is not None else max(n // prompts, 1))
    if n != want or n == 0:
        raise UsageError(f"latents: {n} images for {prompts} prompt(s) x {per if per is not None else n // prompts or 1} "
                         f"image(s) each; expected {want}")
    k = n // prompts
    return [lat[j * k:(j + 1) * k] for j in range(prompts)]


__all__ = ["KoalaError", "Pipeline", "PipelineOutput", "UsageError"]
