"""Model sources: a hub id, a local diffusers folder, or a built-in `random:<preset>`.

A source knows each component's config without loading weights; `build(component)` makes the
PyTorch module (random weights seeded per component for presets, so every process builds the same
model; weights from disk for folders and hub snapshots).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from koala_core.errors import KoalaError, UsageError
from koala_core.jsonfile import read_json

MODULES = ("text_encoder", "text_encoder_2", "unet", "vae")
PRESET_PREFIX = "random:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What the sampler needs from a snapshot besides weights.
HUB_PATTERNS = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*"]


@dataclass(frozen=True)
class SamplerDefaults:
    """How the model is meant to be sampled (KOALA base: 25 steps; Lightning: 10 steps, 3.5)."""

    steps: int
    guidance: float


def _config_files() -> Any:
    return resources.files("exporter").joinpath("configs")


def preset_names() -> list[str]:
    return [k for k in json.loads(_config_files().joinpath("presets.json").read_text()) if not k.startswith("_")]


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


@dataclass
class ModelSource:
    """Where a pipeline comes from, and each component's config."""

    ref: str
    kind: str  # "preset" | "folder" | "hub"
    configs: dict[str, dict[str, Any]]
    sampler: SamplerDefaults
    root: Path | None = None
    description: str = ""
    vae_path: Path | None = None  # a separate VAE folder (e.g. an fp16-safe SDXL VAE) replacing the pipeline's
    controlnet: str | None = None  # --controlnet as given (its config is configs["controlnet"]; exporter/controlnet.py)
    controlnet_root: Path | None = None  # its folder; None for the random one
    _tokenizers: tuple[Path, Path] | None = field(default=None, repr=False)

    # ----- what the exporter and the reference need -------------------------------------------
    @property
    def name(self) -> str:
        return self.ref[len(PRESET_PREFIX):] if self.kind == "preset" else self.ref

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self.configs["scheduler"]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1)

    @property
    def default_size(self) -> int:
        return int(self.configs["unet"]["sample_size"]) * self.vae_scale_factor

    def config_sha256(self) -> dict[str, str]:
        return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest() for k, v in self.configs.items()}

    def tokenizer_dirs(self) -> tuple[Path, Path]:
        if self._tokenizers is None:
            assert self.root is not None
            self._tokenizers = (self.root / "tokenizer", self.root / "tokenizer_2")
        return self._tokenizers

    def build(self, module: str, device: str = "cpu") -> Any:
        """The PyTorch module for `module` (one of MODULES), in float32 eval mode."""
        import torch

        if module == "controlnet" and "controlnet" in self.configs:
            from exporter.controlnet import build

            return build(self.configs["controlnet"], self.controlnet_root, _seed(f"{self.ref}/controlnet"), device)
        if module not in MODULES:
            raise UsageError(f"unknown module {module!r}; expected one of {', '.join(MODULES)}")
        cls = _module_class(module)
        if module == "vae" and self.vae_path is not None and device != "meta":
            return _from_folder(cls, "vae", self.vae_path, subfolder=None).eval().requires_grad_(False)
        if device == "meta":
            with torch.device("meta"):
                model = _from_config(cls, module, self.configs[module])
        elif self.kind == "preset":
            with torch.device("meta"):
                model = _from_config(cls, module, self.configs[module])
            model = model.to_empty(device=device)
            random_init(model, _seed(f"{self.ref}/{module}"))
        else:
            model = _from_folder(cls, module, self.root)
        return model.eval().requires_grad_(False)

    def parameter_count(self, module: str) -> int:
        """Parameters of `module`, counted on the meta device (no weights allocated)."""
        model = self.build(module, device="meta")
        return sum(p.numel() for p in model.parameters())

    def pipeline(self, task: str = "text2img") -> Any:
        """diffusers' StableDiffusionXLPipeline over the same components (the PyTorch reference); task
        "img2img" / "inpaint": StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline
        (no aesthetic-score conditioning, as for a base model)."""
        import diffusers
        from diffusers import EulerDiscreteScheduler
        from transformers import CLIPTokenizer

        cls = {"text2img": diffusers.StableDiffusionXLPipeline, "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
               "inpaint": diffusers.StableDiffusionXLInpaintPipeline}[task]
        extra = {} if task == "text2img" else {"requires_aesthetics_score": False}
        tok1, tok2 = self.tokenizer_dirs()
        return cls(
            **extra,
            vae=self.build("vae"),
            text_encoder=self.build("text_encoder"),
            text_encoder_2=self.build("text_encoder_2"),
            tokenizer=CLIPTokenizer.from_pretrained(str(tok1)),
            tokenizer_2=CLIPTokenizer.from_pretrained(str(tok2)),
            unet=self.build("unet"),
            scheduler=EulerDiscreteScheduler.from_config(self.scheduler_config),
        )


def random_init(model: Any, seed: int) -> None:
    """Deterministic random weights, fast enough for the 2.6B-parameter SDXL U-Net on two cores.

    Built on the meta device and filled here instead of by each library's own initializer (which
    takes tens of seconds at full size). The scheme is PyTorch's default for Linear and Conv
    (uniform in +-1/sqrt(fan_in), weights and biases alike), N(0, 0.02) for embeddings as CLIP's
    initializer does, and identity for normalization layers. Buffers the models compute at
    construction (CLIP's position ids) are rebuilt by the library: we only touch parameters."""
    import math

    import numpy as np
    import torch

    # One numpy generator per tensor, spawned from the seed: deterministic whatever the thread
    # schedule, and numpy fills float32 about 2x faster than torch's generator (and releases the GIL).
    jobs: list[tuple[torch.Tensor, str, float]] = []
    for mod in model.modules():
        params = dict(mod.named_parameters(recurse=False))
        if not params:
            continue
        if isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
            jobs += [(p, "one" if name == "weight" else "zero", 0.0) for name, p in params.items()]
        elif isinstance(mod, torch.nn.Embedding):
            jobs += [(p, "normal", 0.02) for p in params.values()]
        else:
            w = params.get("weight")
            fan_in = w[0].numel() if w is not None and w.ndim > 1 else None
            jobs += [(p, "normal", 0.02) if fan_in is None else (p, "uniform", 1.0 / math.sqrt(fan_in)) for p in params.values()]
    seeds = np.random.SeedSequence(seed).spawn(len(jobs))

    def fill(job: tuple[torch.Tensor, str, float], seq: np.random.SeedSequence) -> None:
        p, kind, scale = job
        a = p.detach().numpy().reshape(-1)
        rng = np.random.default_rng(seq)
        if kind == "uniform":
            rng.random(out=a, dtype=np.float32)
            a *= np.float32(2 * scale)
            a -= np.float32(scale)
        elif kind == "normal":
            rng.standard_normal(out=a, dtype=np.float32)
            a *= np.float32(scale)
        else:
            a.fill(1.0 if kind == "one" else 0.0)

    from concurrent.futures import ThreadPoolExecutor

    with torch.no_grad(), ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        list(pool.map(fill, jobs, seeds))
    # to_empty() leaves buffers uninitialized: recompute those that are pure functions of shape.
    for mod in model.modules():
        if hasattr(mod, "position_ids") and isinstance(getattr(mod, "position_ids"), torch.Tensor):
            mod.position_ids.copy_(torch.arange(mod.position_ids.shape[-1]).expand_as(mod.position_ids))


def _module_class(module: str) -> Any:
    if module == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel
    if module == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModel if module == "text_encoder" else CLIPTextModelWithProjection


def _from_config(cls: Any, module: str, config: dict[str, Any]) -> Any:
    if module.startswith("text_encoder"):
        from transformers import CLIPTextConfig

        cfg = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
        cfg._attn_implementation = "sdpa"
        return cls(cfg)
    return cls.from_config(config)


def _from_folder(cls: Any, module: str, root: Path | None, subfolder: str | None = "") -> Any:
    """Weights from a diffusers folder (fp32, or the fp16 variant upcast to fp32)."""
    import torch

    assert root is not None
    sub = module if subfolder == "" else subfolder
    kwargs: dict[str, Any] = {"torch_dtype": torch.float32}
    if sub:
        kwargs["subfolder"] = sub
    try:
        try:
            return cls.from_pretrained(str(root), **kwargs)
        except (OSError, EnvironmentError):
            if module.startswith("text_encoder"):
                raise
            return cls.from_pretrained(str(root), variant="fp16", **kwargs)
    except (OSError, EnvironmentError) as e:
        where = root / sub if sub else root
        raise KoalaError(f"cannot load the {module} weights from {where}: {str(e).splitlines()[0]}") from None


def with_vae(source: ModelSource, vae: Path | str) -> ModelSource:
    """The same source with its VAE replaced by a separate AutoencoderKL folder (config.json + weights),
    e.g. a local copy of madebyollin/sdxl-vae-fp16-fix."""
    vae = Path(vae).expanduser().resolve()
    if not (vae / "config.json").is_file():
        raise UsageError(f"--vae {vae}: not an AutoencoderKL folder (no config.json)")
    cfg = read_json(vae / "config.json")
    if cfg.get("_class_name") not in (None, "AutoencoderKL"):
        raise UsageError(f"--vae {vae}: config is a {cfg.get('_class_name')}, not an AutoencoderKL")
    configs = dict(source.configs, vae=cfg)
    return replace(source, configs=configs, vae_path=vae)


def with_controlnet(source: ModelSource, ref: str) -> ModelSource:
    """The same source with a ControlNet (`export --controlnet`): a ControlNetModel folder, a hub id, or
    `random:` (built from the U-Net's config); its residuals checked against the U-Net's first."""
    from exporter.controlnet import resolve_controlnet

    cfg, root = resolve_controlnet(ref, source.configs["unet"])
    local = root is not None and Path(ref).expanduser().exists()  # recorded as an absolute path, found from anywhere
    return replace(source, configs=dict(source.configs, controlnet=cfg), controlnet=str(root) if local else ref, controlnet_root=root)


def resolve_recorded(model: str, controlnet: str | None = None) -> ModelSource:
    """The source an artifacts manifest records: its model, with its ControlNet where it has one."""
    source = resolve(model)
    return with_controlnet(source, controlnet) if controlnet else source


# ----- resolving --model ------------------------------------------------------------------------

def _preset(ref: str) -> ModelSource:
    name = ref[len(PRESET_PREFIX):]
    presets = json.loads(_config_files().joinpath("presets.json").read_text())
    if name not in presets or name.startswith("_"):
        raise UsageError(f"unknown preset {ref!r}; built-in presets: {', '.join(PRESET_PREFIX + n for n in preset_names())}")
    entry = presets[name]
    configs: dict[str, dict[str, Any]] = {}
    needs_tokenizer = False
    for key in (*MODULES, "scheduler"):
        part = entry[key]
        cfg = json.loads(_config_files().joinpath(part["base"]).read_text())
        cfg.update(part.get("override", {}))
        needs_tokenizer |= cfg.get("vocab_size") == "tokenizer"
        configs[key] = cfg
    source = ModelSource(ref=ref, kind="preset", configs=configs, sampler=SamplerDefaults(**entry["sampler"]),
                         description=entry.get("description", ""))
    from exporter.tokenizer_gen import preset_tokenizers, vocab_size

    source._tokenizers = preset_tokenizers()
    if needs_tokenizer:
        size = vocab_size(source._tokenizers[0])
        for key in ("text_encoder", "text_encoder_2"):
            if configs[key].get("vocab_size") == "tokenizer":
                configs[key]["vocab_size"] = size
    return source


def _sampler_for(root: Path, ref: str, scheduler: dict[str, Any]) -> SamplerDefaults:
    # KOALA-Lightning ships with trailing spacing and is sampled in 10 steps at guidance 3.5.
    lightning = "lightning" in ref.lower() or scheduler.get("timestep_spacing") == "trailing"
    return SamplerDefaults(steps=10, guidance=3.5) if lightning else SamplerDefaults(steps=25, guidance=5.0)


def _folder(root: Path, ref: str, kind: str) -> ModelSource:
    if not root.is_dir():
        raise UsageError(f"model path {root} is not a folder")
    index = root / "model_index.json"
    if not index.is_file():
        raise UsageError(f"{root} is not a diffusers model folder (no model_index.json)")
    model_index = read_json(index)
    configs: dict[str, dict[str, Any]] = {}
    for key in MODULES:
        if key not in model_index:
            raise UsageError(f"{root} has no {key} in model_index.json: not an SDXL/KOALA pipeline")
        configs[key] = read_json(root / key / "config.json")
    sched = root / "scheduler" / "scheduler_config.json"
    configs["scheduler"] = read_json(sched)
    for tok in ("tokenizer", "tokenizer_2"):
        if not (root / tok).is_dir():
            raise UsageError(f"{root} has no {tok}/ folder")
    return ModelSource(ref=ref, kind=kind, configs=configs, sampler=_sampler_for(root, ref, configs["scheduler"]), root=root)


def _hub(ref: str) -> ModelSource:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError("loading a hub id needs huggingface_hub (pip install 'koala-trt[export]')") from None
    try:
        root = Path(snapshot_download(ref, allow_patterns=HUB_PATTERNS + ["*/*.safetensors"]))
    except Exception as e:  # offline, unknown repo, gated: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KoalaError(
            f"cannot download {ref!r} from the Hugging Face Hub ({reason[:160]}); "
            f"download it where the network allows and pass the local diffusers folder instead: --model /path/to/{ref.split('/')[-1]}"
        ) from None
    return _folder(root, ref, kind="hub")


def resolve(ref: str) -> ModelSource:
    """Resolve --model: `random:<preset>`, an existing diffusers folder, or a hub id."""
    if ref.startswith(PRESET_PREFIX):
        return _preset(ref)
    path = Path(ref).expanduser()
    if path.exists():
        return _folder(path.resolve(), ref, kind="folder")
    if HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return _hub(ref)
    raise UsageError(f"model {ref!r} not found: not a folder, not a hub id, not a preset (try random:tiny)")
