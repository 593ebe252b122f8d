"""The text-to-image loop in numpy over any backend: tokenize, encode, denoise with classifier-free
guidance, decode. It does what diffusers' StableDiffusionXLPipeline.__call__ does (default
arguments: no clip skip, no guidance rescale, original size = target size, crop (0, 0)), so the
same components and the same initial latents give the same image.

No torch, no diffusers: numpy, `tokenizers` and the backend (runtime/backend.py) only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from exporter.manifest import Manifest
from exporter.specs import NUMPY_DTYPES, ComponentSpec, ShapeRange, check_tile
from koala_core.errors import UsageError
from koala_core.jsonfile import read_json
from sampler.controlnet import CONTROLNET, UNET_CONTROLNET, plan_control
from sampler.controlnet import residuals as control_residuals
from sampler.schedulers import make_scheduler
from sampler.schedulers.noise import StepNoise
from sampler.tokenize import ClipTokenizer, chunk_prompts, prompt_tokens

F32 = np.float32
SAMPLER_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")


def loop_components(cache_interval: int = 1, control: bool = False, image: bool = False, unet: str = "unet") -> list[str]:
    """The networks one image request runs: the U-Net pair where it caches features, the ControlNet and
    the U-Net taking its residuals where it has a control image, the VAE encoder where it starts from an
    image; `unet` is the graph of a plain step."""
    unets = ["unet_deep", "unet_shallow"] if cache_interval > 1 else [unet]
    if control:
        unets = [CONTROLNET, UNET_CONTROLNET]
    return ["text_encoder", "text_encoder_2", *unets, "vae_decoder", *(["vae_encoder"] if image else [])]


# ----- what the loop needs besides the networks ---------------------------------------------------

@dataclass(frozen=True)
class PipelineAssets:
    """Everything the sampler reads besides the networks: specs, tokenizers, scheduler config, VAE
    scaling, the model's sampling defaults and the sizes the components were exported for."""

    specs: dict[str, ComponentSpec]
    tokenizer_dirs: tuple[Path, Path]
    scheduler_config: dict[str, Any]
    scaling_factor: float
    steps: int
    guidance: float
    height: int
    width: int
    shape_ranges: dict[str, ShapeRange] = field(default_factory=dict)
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_zeros_for_empty_prompt: bool = True  # SDXL base's pipeline config (and KOALA's)
    origin: str = ""
    unet_config: dict[str, Any] = field(default_factory=dict)  # diffusers' U-Net config, where recorded (cache branches)

    @classmethod
    def from_manifest(cls, m: Manifest) -> "PipelineAssets":
        """From an artifacts folder: the manifest's specs, shape ranges, "sampler" and "vae" entries,
        plus tokenizer/, tokenizer_2/ and the scheduler config beside it."""
        specs = m.specs()
        return cls._from_folder(m.root, m.data, specs, {n: c.shape_range for n, c in m.view.components.items() if c.shape_range is not None},
                                "re-export the artifacts with `koala-trt export`")

    @classmethod
    def from_engines(cls, root: Path, data: Mapping[str, Any], specs: dict[str, ComponentSpec],
                     shape_ranges: dict[str, ShapeRange]) -> "PipelineAssets":
        """From a `koala-trt build` folder: its manifest carries the artifacts' "sampler" and "vae"
        entries and the build copies the tokenizers and the scheduler config, so no artifacts folder
        is needed; the shape ranges are the engines' optimization profiles."""
        if not data.get("tokenizers") or not data.get("scheduler"):
            raise UsageError(f"{root} holds no tokenizers or scheduler config; pass --artifacts DIR (the folder the engines were built from)")
        return cls._from_folder(root, data, specs, shape_ranges, "pass --artifacts DIR (the folder the engines were built from)")

    @classmethod
    def _from_folder(cls, root: Path, d: Mapping[str, Any], specs: dict[str, ComponentSpec],
                     shape_ranges: dict[str, ShapeRange], fix: str) -> "PipelineAssets":
        missing = [k for k in ("sampler", "vae", "scheduler", "tokenizers") if not d.get(k)]
        if missing:
            raise UsageError(f"{root}/manifest.json lacks {', '.join(missing)}: {fix}")
        sched = read_json(root / d["scheduler"])
        vae_cfg = d.get("configs", {}).get("vae", {})
        s = d["sampler"]
        toks = tuple(root / t for t in d["tokenizers"])
        if len(toks) != 2:
            raise UsageError(f"{root}/manifest.json: expected two tokenizers, found {len(toks)}")
        return cls(specs=specs, tokenizer_dirs=toks, scheduler_config=sched,  # type: ignore[arg-type]
                   scaling_factor=float(d["vae"]["scaling_factor"]), steps=int(s["steps"]), guidance=float(s["guidance"]),
                   height=int(s.get("height", 1024)), width=int(s.get("width", 1024)), shape_ranges=shape_ranges,
                   latents_mean=_tuple(vae_cfg.get("latents_mean")), latents_std=_tuple(vae_cfg.get("latents_std")),
                   force_zeros_for_empty_prompt=bool(s.get("force_zeros_for_empty_prompt", True)),
                   origin=f"{root} ({d.get('source', {}).get('model', '?')})", unet_config=dict(d.get("configs", {}).get("unet", {})))

    @classmethod
    def from_source(cls, source: Any) -> "PipelineAssets":
        """From a model source (the torch backend without an artifacts folder): configs only, no weights."""
        from exporter.specs import specs_from_configs

        vae = source.configs["vae"]
        size = source.default_size
        return cls(specs=specs_from_configs(source.configs), tokenizer_dirs=tuple(source.tokenizer_dirs()),  # type: ignore[arg-type]
                   scheduler_config=dict(source.scheduler_config), scaling_factor=float(vae.get("scaling_factor", 0.18215)),
                   steps=source.sampler.steps, guidance=source.sampler.guidance, height=size, width=size,
                   latents_mean=_tuple(vae.get("latents_mean")), latents_std=_tuple(vae.get("latents_std")),
                   origin=source.ref, unet_config=dict(source.configs["unet"]))


def _tuple(v: Any) -> tuple[float, ...] | None:
    return None if v is None else tuple(float(x) for x in v)


# ----- one request ------------------------------------------------------------------------------

@dataclass
class Request:
    """What one image request asks for (`koala-trt generate`, serve, bench, sampler.api.Pipeline);
    None means the model's default (manifest "sampler"). Per-request inputs that features add are
    fields here, named as diffusers names them, and keywords of sampler.api.Pipeline.__call__."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    batch: int | None = None
    latents: np.ndarray | None = None  # initial noise as diffusers' `latents=` takes it (before * init_noise_sigma)
    vae_tile: int | None = None  # decode in tiles of this many pixels (sampler/vae_tiling.py); None: the engine's own, else untiled
    scheduler: str | None = None  # a name in sampler.schedulers.SCHEDULERS; None: the model's own (euler)
    image: Any = None  # img2img / inpainting (sampler/img2img.py): PIL image, PNG path or bytes, uint8 [H, W, 3]
    mask_image: Any = None  # inpainting: white = repaint; PIL image, path, bytes or uint8 [H, W]
    strength: float | None = None  # (0, 1]; default 0.3 for img2img, 0.9999 for inpainting (diffusers')
    cache_interval: int = 1  # feature caching (sampler/feature_cache.py): the full U-Net every N steps; 1: off
    cache_branch: int | None = None  # where the U-Net is split for caching [the exported unet_deep's branch]
    # ControlNet (sampler/controlnet.py), diffusers' names: PNG bytes, a PIL image or a uint8 [H, W, 3] array
    control_image: Any = None
    controlnet_conditioning_scale: float | None = None  # [1.0]
    control_guidance_start: float | None = None  # [0.0]
    control_guidance_end: float | None = None  # [1.0]


@dataclass(frozen=True)
class Plan:
    """A validated request: every number resolved, the initial noise made."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    seed: int | None
    height: int
    width: int
    batch: int
    noise: np.ndarray  # float32 [batch, C, height/f, width/f]
    chunks: int = 1  # prompt chunks of 77 tokens each prompt is encoded as (sampler.tokenize.chunk_prompts)
    vae_tile: int | None = None  # pixels; None: one untiled decode
    scheduler: str | None = None  # sampler.schedulers name; None: the model's own
    step_seed: int = 0  # the seed of the step noise stochastic schedulers add (sampler/schedulers/noise.py)
    image_inputs: Any = None  # sampler.img2img.ImageInputs for img2img / inpainting, else None
    cache_interval: int = 1  # feature caching: unet_deep every N steps, unet_shallow between (1: off)
    cache_branch: int | None = None
    control: Any = None  # sampler.controlnet.ControlPlan, or None without a control image

    @property
    def cfg(self) -> bool:
        # Classifier-free guidance (Ho & Salimans 2022) only when it changes anything, as diffusers decides.
        return self.guidance > 1.0

    @property
    def encode_negative(self) -> bool:
        return self.cfg and bool(self.negative_prompt)


def check_prompt_range(unet: ComponentSpec, r: ShapeRange | None, tokens: int) -> int:
    """The one prompt-length check (sampler, validate): a prompt of `tokens` ids against the U-Net's
    range `r` (one chunk for a U-Net exported before long prompts; any length for a backend without a
    recorded range, torch from a model source); its chunk count, or UsageError naming the limit."""
    if r is None and unet.has_sequence:
        r = ShapeRange((1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1 << 20))
    elif r is None:
        r = ShapeRange((1, 1, 1), (1, 1, 1), (1, 1, 1))
    elif not unet.has_sequence:
        r = ShapeRange(r.batch, r.height, r.width)
    return r.check_prompt(unet.name, tokens)


def initial_noise(seed: int, batch: int, shape: tuple[int, ...]) -> np.ndarray:
    """The initial latents for --seed: image i is standard normal noise from numpy's PCG64 seeded with
    seed + i, so every backend starts from the same noise and image i of a batch equals a batch-1
    run with seed + i. (This is not torch's generator: diffusers' `generator=` gives other noise;
    pass it with --latents to compare.)"""
    return np.stack([np.random.default_rng(seed + i).standard_normal(shape, dtype=F32) for i in range(batch)])


# ----- timings ----------------------------------------------------------------------------------

@dataclass
class Timings:
    """Seconds per stage; `unet` and `step` hold one entry per denoising step (step = the whole loop
    iteration, so step - unet is the sampler's own work: scaling, CFG, the scheduler update)."""

    stages: dict[str, list[float]] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.stages.setdefault(stage, []).append(seconds)

    def total(self, stage: str) -> float:
        return float(sum(self.stages.get(stage, [])))

    def model_seconds(self) -> float:
        return sum(self.total(c) for c in (*SAMPLER_COMPONENTS, "vae_encoder", "controlnet"))

    def step_overheads(self) -> list[float]:
        return [s - u for s, u in zip(self.stages.get("step", []), self.stages.get("unet", []))]

    def summary(self) -> dict[str, Any]:
        """Per stage: calls, total and per-call ms, and the non-model overhead (all of `sample`
        except time inside backend.run; per denoising step: the loop's own work)."""
        rows: dict[str, Any] = {}
        for k in ("tokenize", "vae_encoder", *SAMPLER_COMPONENTS, "controlnet", "postprocess"):
            v = self.stages.get(k, [])
            if v:
                rows[k] = {"calls": len(v), "total_ms": 1e3 * sum(v), "per_call_ms": 1e3 * sum(v) / len(v)}
        over = self.step_overheads()
        sample = self.total("sample")
        unet = self.stages.get("unet", [])
        per_step = 1e3 * sum(over) / len(over) if over else 0.0
        unet_step = 1e3 * sum(unet) / len(unet) if unet else 0.0
        return {
            "stages": rows,
            "overhead": {"total_ms": 1e3 * (sample - self.model_seconds()),
                         "per_step_ms": per_step, "per_step_max_ms": 1e3 * max(over, default=0.0),
                         "per_step_pct_of_unet": 100.0 * per_step / unet_step if unet_step else 0.0},
            "total_ms": 1e3 * sample,
        }


# ----- the sampler ------------------------------------------------------------------------------

class Sampler:
    """SDXL/KOALA text-to-image over `backend` (any object with the runtime.Backend interface)."""

    def __init__(self, backend: Any, assets: PipelineAssets) -> None:
        self.backend, self.assets = backend, assets
        specs = dict(assets.specs)
        specs.update(getattr(backend, "specs", {}) or {})
        # The full U-Net: `unet`, else feature caching's unet_deep (its out_sample is the same U-Net's), else
        # the ControlNet U-Net (unet_controlnet; a folder holding only that runs with a control image only).
        missing = [c for c in SAMPLER_COMPONENTS if c not in specs and not (c == "unet" and ("unet_deep" in specs or UNET_CONTROLNET in specs))]
        if missing:
            raise UsageError(f"{assets.origin or 'the backend'} has no {', '.join(missing)}: the sampler needs {', '.join(SAMPLER_COMPONENTS)}")
        self.specs = specs
        self.unet, self.vae = specs.get("unet") or specs.get("unet_deep") or specs[UNET_CONTROLNET], specs["vae_decoder"]
        self.seq_len = int(specs["text_encoder"].input("input_ids").dims[1])
        self.tokenizers = tuple(ClipTokenizer(d, max_length=self.seq_len) for d in assets.tokenizer_dirs)
        self.scheduler = make_scheduler(None, assets.scheduler_config)  # the last plan's (generate reports its timesteps)

    # ----- validation -----------------------------------------------------------------------------
    def _range(self, component: str) -> ShapeRange | None:
        """The sizes the backend can run `component` at: its own `shape_range`, else its manifest's (an
        engines folder records each engine's profile), else the artifacts' export range."""
        probe: Callable[[str], ShapeRange | None] | None = getattr(self.backend, "shape_range", None)
        if probe is None:
            probe = getattr(getattr(self.backend, "manifest", None), "shape_range", None)
        if probe is not None:
            try:
                return probe(component)
            except (KeyError, UsageError):
                pass
        return self.assets.shape_ranges.get(component)

    def plan(self, req: Request) -> Plan:
        """Resolve defaults and check everything a model run could trip on; raises UsageError."""
        a = self.assets
        steps = a.steps if req.steps is None else int(req.steps)
        guidance = a.guidance if req.guidance is None else float(req.guidance)
        sched = make_scheduler(req.scheduler, a.scheduler_config)  # an unknown name or config field: one line, before model work
        if not 1 <= steps <= sched.num_train_timesteps:
            raise UsageError(f"--steps must be between 1 and {sched.num_train_timesteps} (got {steps})")
        if not math.isfinite(guidance) or guidance < 0:
            raise UsageError(f"--guidance must be a finite number >= 0 (got {guidance})")
        lat = req.latents
        c_in = int(self.vae.input("latent_sample").dims[1])  # the latents' channels (a 9-channel inpainting U-Net takes 4 + 5)
        f = self.unet.latent_factor
        image_inputs, req_h, req_w = self._image_inputs(req, f)
        if lat is not None and lat.ndim == 4:  # sizes default to the latents' own
            height = int(lat.shape[2]) * f if req_h is None else req_h
            width = int(lat.shape[3]) * f if req_w is None else req_w
            batch = int(lat.shape[0]) if req.batch is None else req.batch
        else:  # None is the default; 0 is an error below, never "the default"
            height = a.height if req_h is None else req_h
            width = a.width if req_w is None else req_w
            batch = 1 if req.batch is None else req.batch
        if batch < 1:
            raise UsageError(f"--batch must be at least 1 (got {batch})")
        if height <= 0 or width <= 0 or height % 8 or width % 8:
            raise UsageError(f"--height and --width must be positive multiples of 8 (got {height}x{width})")
        for spec in (self.unet, self.vae):
            if height % spec.size_multiple or width % spec.size_multiple:
                raise UsageError(f"{spec.name}: --height and --width must be multiples of {spec.size_multiple} for this model (got {height}x{width})")
        vae_tile = self._vae_tile(req.vae_tile, height, width)
        from sampler.feature_cache import check_cache

        cache_interval, cache_branch = check_cache(self.specs, req.cache_interval, req.cache_branch, sched,
                                                   self.assets.unet_config, self.backend)
        if cache_interval > 1:
            self.specs.update({k: v for k, v in (getattr(self.backend, "specs", {}) or {}).items() if k.startswith("unet_")})
        prompts = 2 if (guidance > 1.0 and (req.negative_prompt or not a.force_zeros_for_empty_prompt)) else 1
        unet_batch = 2 * batch if guidance > 1.0 else batch
        encoder = (("vae_encoder", 1),) if image_inputs is not None else ()  # the image is encoded once
        unets = ("unet_deep", "unet_shallow") if cache_interval > 1 else (self.unet.name,)
        for comp, b in (("text_encoder", prompts), ("text_encoder_2", prompts), *((u, unet_batch) for u in unets),
                        ("vae_decoder", batch), *encoder):
            r = self._range(comp)
            if r is None:
                continue
            what = f"batch {b}" + (" (2 x --batch with classifier-free guidance)" if comp.startswith("unet") and unet_batch != batch else "")
            if comp == "vae_decoder" and vae_tile:  # the decoder runs on tiles, not on the image
                r.check(comp, self.specs[comp].spatial, vae_tile, vae_tile, batch=b, batch_what=what,
                        fix=f"the VAE decodes {vae_tile}x{vae_tile} tiles: pick a --vae-tile inside that range")
                continue
            r.check(comp, self.specs[comp].spatial, height, width, batch=b, batch_what=what)
        chunks = self.check_prompt(req.prompt, req.negative_prompt if prompts == 2 else None)
        control = plan_control(self.specs, req.control_image, req.controlnet_conditioning_scale, req.control_guidance_start,
                               req.control_guidance_end, height, width, batch, guidance > 1.0, self.assets.origin or "the backend")
        if control is not None and cache_interval > 1:
            raise UsageError("a control image and --cache-interval together are not supported (the ControlNet's residuals "
                             "change the U-Net's features every step); drop one of them")
        if control is None and "unet" not in self.specs and "unet_deep" not in self.specs:
            raise UsageError(f"{a.origin or 'the backend'} holds the ControlNet U-Net only (no unet): pass a control image")
        for comp in ((CONTROLNET, UNET_CONTROLNET) if control is not None else ()):
            r = self._range(comp)
            if r is not None:
                r.check(comp, True, height, width, batch=unet_batch, batch_what=f"batch {unet_batch}")
        shape = (batch, c_in, height // f, width // f)
        if lat is not None:
            if lat.dtype != np.float32:
                raise UsageError(f"--latents: dtype {lat.dtype}, expected float32")
            if tuple(lat.shape) != shape:
                raise UsageError(f"--latents: shape {tuple(lat.shape)}, expected {shape} (batch, channels, height/{f}, width/{f})")
            if not np.isfinite(lat).all():
                raise UsageError("--latents: contains NaN or infinite values")
            noise, seed = np.ascontiguousarray(lat), None
        else:
            if req.seed < 0:
                raise UsageError(f"--seed must be >= 0 (got {req.seed})")
            noise, seed = initial_noise(int(req.seed), batch, shape[1:]), int(req.seed)
        if image_inputs is not None:
            from sampler.img2img import check_steps_left

            check_steps_left(steps, image_inputs.strength)
        return Plan(req.prompt, req.negative_prompt, steps, guidance, seed, height, width, batch, noise, chunks, vae_tile,
                    scheduler=req.scheduler, step_seed=max(int(req.seed), 0), image_inputs=image_inputs,
                    cache_interval=cache_interval, cache_branch=cache_branch, control=control)

    def components(self, plan: Plan | None = None) -> list[str]:
        """The components `plan` runs (what to load): loop_components of its options."""
        if plan is None:
            return loop_components(unet=self.unet.name)
        return loop_components(plan.cache_interval, plan.control is not None, plan.image_inputs is not None, self.unet.name)

    def _image_inputs(self, req: Request, f: int) -> tuple[Any, int | None, int | None]:
        """img2img / inpainting inputs checked and preprocessed (sampler/img2img.py), with the run's
        height and width defaulting to the image's; the VAE encoder is needed only here."""
        from sampler.img2img import prepare

        inputs, h, w = prepare(req.image, req.mask_image, req.strength, req.height, req.width, f,
                               int(self.unet.input("sample").dims[1]))
        if req.image is not None and "vae_encoder" not in self.specs:
            from sampler.img2img import no_encoder

            raise no_encoder(self.assets.origin or "the backend")
        return inputs, h, w

    def check_prompt(self, prompt: str, negative_prompt: str | None = None) -> int:
        """The chunks the prompt (and the negative prompt, when it is encoded) take, inside the U-Net's
        sequence range (its backend's, else its export's); UsageError naming the limit."""
        tokens = prompt_tokens(self.tokenizers, [prompt] if negative_prompt is None else [negative_prompt, prompt])
        return check_prompt_range(self.unet, self._range(self.unet.name), tokens)

    def _vae_tile(self, asked: int | None, height: int, width: int) -> int | None:
        """The decode's tile size in pixels: --vae-tile, else the one the VAE engine was built for (a
        profile's [vae] tile), else None (untiled); checked against the image and the VAE's granularity."""
        built = getattr(self.backend, "vae_tile", lambda: None)()  # runtime.Backend.vae_tile
        tile, what = (asked, "--vae-tile") if asked is not None else (built, f"the VAE engine's tile (built for {built} px)")
        if tile is None:
            return None
        try:
            check_tile(tile, height, width, self.vae.latent_factor)
        except ValueError as e:
            if asked is None:  # the engine runs tiles of its size only
                fix = f"; generate at least {built}x{built} px, or rebuild the VAE engine with a smaller [vae] tile"
            else:
                fix = f"; use at most {min(height, width)} px, or no --vae-tile" if tile >= self.vae.latent_factor else ""
            raise UsageError(f"{what} {e}{fix}") from None
        return tile

    # ----- the loop -----------------------------------------------------------------------------
    def _run(self, timings: Timings, component: str, feeds: dict[str, np.ndarray], stage: str | None = None) -> dict[str, np.ndarray]:
        """backend.run with the feeds in the spec's dtypes (fp16 I/O graphs or engines) and float32 back;
        its time under `stage` [the component]."""
        spec = self.specs[component]
        feeds = {k: v.astype(NUMPY_DTYPES[spec.input(k).dtype], copy=False) for k, v in feeds.items()}
        t0 = time.perf_counter()
        out = self.backend.run(component, feeds)
        timings.add(stage or component, time.perf_counter() - t0)
        return {k: v.astype(F32, copy=False) for k, v in out.items()}

    def encode_prompt(self, plan: Plan, timings: Timings, warn: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:
        """(encoder_hidden_states, text_embeds) for the U-Net batch: SDXL's penultimate hidden states
        of both encoders concatenated on the feature axis per chunk of 77 tokens, the chunks on the
        sequence axis ([rows, 77 x plan.chunks, features]), and text_encoder_2's projected pooled output
        of the first chunk; negatives first (zeros for an empty negative prompt,
        force_zeros_for_empty_prompt), each repeated per image."""
        prompts = [plan.negative_prompt, plan.prompt] if plan.encode_negative else [plan.prompt]
        if plan.cfg and not plan.negative_prompt and not self.assets.force_zeros_for_empty_prompt:
            prompts = ["", plan.prompt]
        t0 = time.perf_counter()
        ids = chunk_prompts(self.tokenizers, prompts, plan.chunks)  # per tokenizer [prompts, chunks, 77]
        timings.add("tokenize", time.perf_counter() - t0)
        chunks, pooled = [], None
        for c in range(plan.chunks):  # one call per chunk: the encoders' batch stays the prompts' count
            h1 = self._run(timings, "text_encoder", {"input_ids": np.ascontiguousarray(ids[0][:, c])})["hidden_states"]
            o2 = self._run(timings, "text_encoder_2", {"input_ids": np.ascontiguousarray(ids[1][:, c])})
            chunks.append(np.concatenate([h1, o2["hidden_states"]], axis=-1))
            if c == 0:
                pooled = o2["text_embeds"].astype(F32, copy=False)
        assert pooled is not None
        hidden = np.concatenate(chunks, axis=1).astype(F32, copy=False)
        pos_h, pos_p = hidden[-1:], pooled[-1:]
        n = plan.batch
        if not plan.cfg:
            return np.repeat(pos_h, n, 0), np.repeat(pos_p, n, 0)
        if len(prompts) == 2:
            neg_h, neg_p = hidden[:1], pooled[:1]
        else:
            neg_h, neg_p = np.zeros_like(pos_h), np.zeros_like(pos_p)
        return (np.concatenate([np.repeat(neg_h, n, 0), np.repeat(pos_h, n, 0)]),
                np.concatenate([np.repeat(neg_p, n, 0), np.repeat(pos_p, n, 0)]))

    def sample(self, plan: Plan, progress: bool = True, warn: Callable[[str], None] | None = None,
               decode: bool = True) -> tuple[np.ndarray, Timings]:
        """Run `plan`; returns (images float32 [batch, height, width, 3] in [0, 1], timings), or with
        decode=False the final latents as diffusers' output_type="latent" gives them."""
        from tqdm import tqdm  # imported before the clock starts

        warn = warn or (lambda msg: None)
        timings = Timings()
        # The progress bar is made before the clock starts (tqdm's first bar sets up a multiprocessing
        # lock, ~50 ms once per process); its per-step updates are timed with the step.
        bar = tqdm(total=plan.steps, desc="denoising", unit="step", disable=not progress, leave=False, dynamic_ncols=True,
                   mininterval=0.5)  # a redraw costs ~0.3 ms: at most two a second
        start = time.perf_counter()
        try:
            latents = self._denoise(plan, timings, warn, bar)
        finally:
            bar.close()
        if not decode:
            timings.add("sample", time.perf_counter() - start)
            return latents, timings
        image = self.decode(self.unscale_latents(latents), timings, plan.vae_tile)
        if not np.isfinite(image).all():
            warn("the VAE decoder returned NaN/inf (an fp16 SDXL VAE overflows; keep the decoder in fp32)")
        t0 = time.perf_counter()
        images = np.clip(image / F32(2) + F32(0.5), 0, 1).transpose(0, 2, 3, 1).astype(F32, copy=False)
        timings.add("postprocess", time.perf_counter() - t0)
        timings.add("sample", time.perf_counter() - start)
        return images, timings

    def decode(self, latents: np.ndarray, timings: Timings | None = None, tile: int | None = None) -> np.ndarray:
        """Latents in the VAE's space (unscale_latents) to the decoder's image, float32 [batch, 3, H, W]
        nominally in [-1, 1]: one decoder run, or with `tile` (pixels) overlapping tiles of that size
        blended (sampler/vae_tiling.py), so the decoder's activations are a tile's however large the image."""
        timings = timings if timings is not None else Timings()

        def run(lat: np.ndarray) -> np.ndarray:
            return self._run(timings, "vae_decoder", {"latent_sample": lat})["sample"]

        if tile is None:
            return run(latents)
        from sampler.vae_tiling import TileGrid, decode_tiled

        return decode_tiled(run, latents, TileGrid.make(latents.shape[2], latents.shape[3], tile, self.vae.latent_factor))

    def tile_grid(self, plan: Plan) -> Any:
        """The vae_tiling.TileGrid a tiled plan decodes over (None when untiled)."""
        from sampler.vae_tiling import TileGrid

        f = self.vae.latent_factor
        return None if plan.vae_tile is None else TileGrid.make(plan.height // f, plan.width // f, plan.vae_tile, f)

    def _denoise(self, plan: Plan, timings: Timings, warn: Callable[[str], None], bar: Any) -> np.ndarray:
        """Encode the prompts, then the plan's scheduler's loop with CFG from the plan's noise; the final latents."""
        hidden, pooled = self.encode_prompt(plan, timings, warn)
        ub = hidden.shape[0]
        # Micro-conditioning (Podell et al. 2023, SDXL, sec. 2.2): original size, crop top-left, target size.
        time_ids = np.tile(np.array([plan.height, plan.width, 0, 0, plan.height, plan.width], F32), (ub, 1))
        sched = self.scheduler = make_scheduler(plan.scheduler, self.assets.scheduler_config)
        sched.set_timesteps(plan.steps)
        assert sched.timesteps is not None
        img_cond = self._conditioning(plan, timings)
        start = 0 if img_cond is None else img_cond.start
        bar.reset(total=len(sched.timesteps) - start)  # trailing spacing gives one extra step for some counts, as in diffusers
        latents = (plan.noise * sched.init_noise_sigma).astype(F32, copy=False) if img_cond is None else img_cond.initial_latents()
        g = F32(plan.guidance)
        n = plan.batch
        step_noise = StepNoise(plan.step_seed, n, latents.shape[1:]) if sched.stochastic else None
        from sampler.feature_cache import FeatureCache

        cache = FeatureCache(plan.cache_interval, self.specs["unet_shallow"]) if plan.cache_interval > 1 else None
        last = len(sched.timesteps) - 1
        for i in range(start, last + 1):
            t = sched.timesteps[i]
            t0 = time.perf_counter()
            x = sched.scale_model_input(latents, i)  # elementwise, so scaling before the CFG copy is the same
            x = np.concatenate([x, x]) if plan.cfg else x
            x = x if img_cond is None else img_cond.unet_input(x)
            feeds = {"sample": x, "timestep": np.full((ub,), t, F32), "encoder_hidden_states": hidden,
                     "text_embeds": pooled, "time_ids": time_ids}
            aside = 0.0
            if plan.control is not None:  # the ControlNet's residuals into the U-Net variant that takes them
                c0 = time.perf_counter()
                feeds.update(control_residuals(lambda c, f: self._run(timings, c, f), self.specs, plan.control, i, len(sched.timesteps), feeds))
                aside = time.perf_counter() - c0
                eps = self._run(timings, UNET_CONTROLNET, feeds, "unet")["out_sample"]
            elif cache is None:
                eps = self._run(timings, self.unet.name, feeds, "unet")["out_sample"]
            else:  # every U-Net call is timed as "unet", whichever graph of the pair ran; refreshes count from `start`
                eps = cache.unet(i - start, feeds, lambda c, f: self._run(timings, c, f, "unet"))
            if plan.cfg:  # Ho & Salimans 2022, eq. 6: eps_uncond + w (eps_cond - eps_uncond)
                uncond, cond = eps[:n], eps[n:]
                eps = uncond + g * (cond - uncond)
            latents = sched.step(eps, i, latents, noise=None if step_noise is None else step_noise())
            if img_cond is not None:
                latents = img_cond.after_step(latents, i, i == last)
            bar.update()
            timings.add("step", time.perf_counter() - t0 - aside)  # the ControlNet is a model stage of its own
        return latents

    def _conditioning(self, plan: Plan, timings: Timings) -> Any:
        """img2img / inpainting state (sampler.img2img.ImageConditioning), the image encoded; None for text-to-image."""
        if plan.image_inputs is None:
            return None
        from sampler.img2img import ImageConditioning

        a = self.assets

        def encode(image: np.ndarray) -> np.ndarray:
            return self._run(timings, "vae_encoder", {"sample": image})["latent_parameters"]

        return ImageConditioning(plan.image_inputs, plan.noise, self.scheduler, plan.steps, plan.cfg, encode, a.scaling_factor,
                                 a.latents_mean, a.latents_std, int(self.unet.input("sample").dims[1]))

    def unscale_latents(self, latents: np.ndarray) -> np.ndarray:
        """Latents back to the VAE's space (Rombach et al. 2022's scaling factor, SDXL's 0.13025)."""
        a = self.assets
        sf = F32(a.scaling_factor)
        if a.latents_mean is not None and a.latents_std is not None:
            mean = np.asarray(a.latents_mean, F32).reshape(1, -1, 1, 1)
            std = np.asarray(a.latents_std, F32).reshape(1, -1, 1, 1)
            return (latents * std / sf + mean).astype(F32)
        return (latents / sf).astype(F32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] float images to 8-bit, rounded as diffusers' numpy_to_pil does."""
    return (images * 255).round().astype(np.uint8)


def save_pngs(images: np.ndarray, paths: list[Path], metadata: Mapping[str, str] | None = None) -> None:
    """Write each image as PNG, each under a temporary name renamed into place when complete."""
    from contextlib import ExitStack

    from PIL import Image, PngImagePlugin

    from koala_core.atomic import staged_file

    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(k, v)
    with ExitStack() as stack:
        for img, path in zip(to_uint8(images), paths):
            tmp = stack.enter_context(staged_file(path))
            Image.fromarray(img).save(tmp, format="PNG", pnginfo=info)


def output_paths(out: Path, batch: int) -> list[Path]:
    """--out for one image; numbered names (out-0.png, out-1.png, ...) for several."""
    if batch == 1:
        return [out]
    width = len(str(batch - 1))
    return [out.with_name(f"{out.stem}-{i:0{width}d}{out.suffix or '.png'}") for i in range(batch)]
