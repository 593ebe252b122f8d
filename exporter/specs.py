"""Component specs: the one source of truth for input/output names, dtypes, axes, shape ranges and
dummy inputs (in the manner of Optimum's ONNX export configs).

Export, precision conversion, the engine build plan, validation and the sampler all read these
specs, or the manifest written from them; nothing else declares a tensor name or a shape.
This module imports numpy only, so the torch-free runtime can use it.

Symbolic dims: `batch` (the tensor's batch, CFG doubled where the U-Net sees it), `height`/`width`
(pixels), `latent_height`/`latent_width` (pixels / the VAE scale factor), `sequence` (the U-Net's
prompt tokens: CHUNK_TOKENS per prompt chunk, see `prompt_chunk_ids`). Every other dim is fixed by
the model's config and written as an integer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np

from koala_core.errors import UsageError

COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", "unet_deep", "unet_shallow")
CACHE_COMPONENTS = ("unet_deep", "unet_shallow")  # feature caching's U-Net pair (`export --cache-branch`)
# Components an export has only when asked for: `export --controlnet` writes the ControlNet and the
# U-Net variant taking its residuals (exporter/controlnet.py).
VARIANT_COMPONENTS = ("controlnet", "unet_controlnet")
DEFAULT_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
NUMPY_DTYPES: dict[str, Any] = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}
MAX_BATCH = 8  # default upper end of every batch range: 4 images with classifier-free guidance
# Long prompts, the convention of ComfyUI and compel: the token ids without start/end token split into
# chunks of CHUNK_TOKENS - 2, each encoded as <start> + chunk + <end> + padding to CHUNK_TOKENS (CLIP's
# 77 positions); the U-Net's encoder_hidden_states is the chunks' hidden states one after another.
CHUNK_TOKENS = 77
DEFAULT_PROMPT_CHUNKS = 3  # default upper end of the U-Net's sequence range: 231 tokens (`export --max-prompt-chunks`)


def prompt_chunk_count(tokens: int, chunk_tokens: int = CHUNK_TOKENS) -> int:
    """Chunks a prompt of `tokens` ids (without start/end token) takes: at least one (the empty prompt)."""
    return max(1, -(-tokens // (chunk_tokens - 2)))


def prompt_chunk_ids(ids: list[int], chunks: int, bos: int, eos: int, pad: int,
                     chunk_tokens: int = CHUNK_TOKENS) -> np.ndarray:
    """int32 [chunks, chunk_tokens]: `ids` (no start/end token) in chunks of chunk_tokens - 2, each
    <bos> + chunk + <eos> + `pad` up to chunk_tokens; chunks past the prompt's own are empty
    (<bos>, <eos>, padding), as a shorter negative prompt is padded to the positive's length."""
    body = chunk_tokens - 2
    if prompt_chunk_count(len(ids), chunk_tokens) > chunks:
        raise ValueError(f"{len(ids)} tokens need more than {chunks} chunk(s) of {body}")
    out = np.full((chunks, chunk_tokens), pad, dtype=np.int32)
    for c in range(chunks):
        part = ids[c * body:(c + 1) * body]
        out[c, 0], out[c, 1:1 + len(part)], out[c, 1 + len(part)] = bos, part, eos
    return out


def symbol_size(sym: str, sizes: Mapping[str, int]) -> int:
    """The size of a symbolic dim: a name of `sizes`, or `name/N` (that size divided by N: a U-Net
    feature N times coarser than the latents, as unet_deep's cached feature)."""
    name, _, div = sym.partition("/")
    return int(sizes[name]) // (int(div) if div else 1)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    dims: tuple[int | str, ...]

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else symbol_size(d, sizes) for d in self.dims)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["dims"]))


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max of the batch, of the image size in pixels and (for a graph with a `sequence` axis,
    the U-Net) of the prompt chunks of CHUNK_TOKENS tokens, as a TensorRT profile takes them.
    prompt_chunks None: no sequence axis (or one fixed at one chunk, as exports before long prompts)."""

    batch: tuple[int, int, int]
    height: tuple[int, int, int]
    width: tuple[int, int, int]
    prompt_chunks: tuple[int, int, int] | None = None

    def to_json(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ShapeRange":
        chunks = d.get("prompt_chunks")
        return cls(tuple(d["batch"]), tuple(d["height"]), tuple(d["width"]),  # type: ignore[arg-type]
                   None if chunks is None else tuple(chunks))  # type: ignore[arg-type]

    @property
    def max_prompt_chunks(self) -> int:
        return 1 if self.prompt_chunks is None else self.prompt_chunks[2]

    def check_prompt(self, component: str, tokens: int, fix: str = "shorten the prompt, or re-export with "
                     "`koala-trt export --max-prompt-chunks N`") -> int:
        """A prompt of `tokens` ids (no start/end token) must fit the sequence range; returns its chunk
        count, or raises UsageError naming the limit."""
        chunks, body = prompt_chunk_count(tokens), CHUNK_TOKENS - 2
        lo, hi = (1, 1) if self.prompt_chunks is None else (self.prompt_chunks[0], self.prompt_chunks[2])
        if chunks > hi:
            raise UsageError(f"the prompt is {tokens} tokens but {component} takes at most {hi * body} "
                             f"({hi} chunk(s) of {body}, {hi * CHUNK_TOKENS} encoder tokens); {fix}")
        return max(chunks, lo)

    def contains(self, batch: int, height: int, width: int) -> bool:
        return all(lo <= v <= hi for v, (lo, _, hi) in ((batch, self.batch), (height, self.height), (width, self.width)))

    def check(self, component: str, spatial: bool, height: int, width: int, batch: int | None = None,
              batch_what: str | None = None, fix: str = "re-export with --height/--width near the size you want") -> None:
        """The one size check before a run (the sampler's plan, validate, bench): `batch` (if given)
        and, for a spatial component, height x width inside the range; UsageError naming the limits."""
        if batch is not None and not self.contains(batch, self.height[0], self.width[0]):
            raise UsageError(f"{component} was exported for batch {self.batch[0]}..{self.batch[2]}, "
                             f"not {batch_what or f'batch {batch}'}; lower --batch")
        if spatial and not self.contains(self.batch[0], height, width):
            raise UsageError(f"{height}x{width} is outside the sizes {component} was exported for "
                             f"(height {self.height[0]}..{self.height[2]}, width {self.width[0]}..{self.width[2]}); {fix}")


@dataclass(frozen=True)
class ComponentSpec:
    """What one exported graph takes and returns. Subclasses fill it in from the model's configs."""

    name: str
    module: str  # the pipeline module it wraps: text_encoder, text_encoder_2, unet or vae
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    latent_factor: int = 8  # pixels per latent cell (the VAE scale factor)
    size_multiple: int = 8  # granularity of height and width, in pixels
    spatial: bool = True  # does the graph depend on the image size?
    extra: dict[str, Any] = field(default_factory=dict)  # config facts dummy inputs need

    kind: ClassVar[str] = ""

    # ----- shapes ---------------------------------------------------------------------------
    def sizes(self, batch: int, height: int, width: int, chunks: int = 1) -> dict[str, int]:
        return {"batch": batch, "height": height, "width": width,
                "latent_height": height // self.latent_factor, "latent_width": width // self.latent_factor,
                "sequence": chunks * int(self.extra.get("chunk_tokens", CHUNK_TOKENS))}

    @property
    def has_sequence(self) -> bool:
        """Does the graph take a prompt of any number of chunks (the U-Net's `sequence` axis)?"""
        return any("sequence" in t.dims for t in self.inputs)

    def input_shapes(self, batch: int, height: int, width: int, chunks: int = 1) -> dict[str, tuple[int, ...]]:
        s = self.sizes(batch, height, width, chunks)
        return {t.name: t.shape(s) for t in self.inputs}

    def output_shapes(self, batch: int, height: int, width: int, chunks: int = 1) -> dict[str, tuple[int, ...]]:
        s = self.sizes(batch, height, width, chunks)
        return {t.name: t.shape(s) for t in self.outputs}

    def profile_shapes(self, r: ShapeRange) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Per input: (min, opt, max) shapes, as a TensorRT optimization profile takes them."""
        chunks = r.prompt_chunks or (1, 1, 1)
        lo, opt, hi = (self.input_shapes(r.batch[i], r.height[i], r.width[i], chunks[i]) for i in range(3))
        return {n: (lo[n], opt[n], hi[n]) for n in lo}

    def check_size(self, height: int, width: int) -> None:
        if height < 1 or width < 1:
            raise UsageError(f"{self.name}: height and width must be positive (got {height}x{width})")
        if self.spatial and (height % self.size_multiple or width % self.size_multiple):
            raise UsageError(f"{self.name}: height and width must be multiples of {self.size_multiple} (got {height}x{width})")

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Names, dtypes and fixed dims of `feeds` against the spec: one clear error, not a runtime's."""
        missing = [t.name for t in self.inputs if t.name not in feeds]
        if missing:
            raise UsageError(f"{self.name}: missing input(s) {', '.join(missing)}")
        for t in self.inputs:
            a = feeds[t.name]
            if a.dtype != NUMPY_DTYPES[t.dtype]:
                raise UsageError(f"{self.name}.{t.name}: dtype {a.dtype}, expected {t.dtype}")
            if a.ndim != len(t.dims) or any(isinstance(d, int) and d != n for d, n in zip(t.dims, a.shape)):
                raise UsageError(f"{self.name}.{t.name}: shape {tuple(a.shape)}, expected {_pretty(t.dims)}")

    # ----- dummy inputs ---------------------------------------------------------------------
    def dummy_inputs(self, batch: int, height: int, width: int, seed: int = 0, chunks: int = 1) -> dict[str, np.ndarray]:
        """Random inputs of the spec's shapes; `chunks` sets the prompt length of a `sequence` axis."""
        raise NotImplementedError

    # ----- (de)serialization for the manifest ----------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "module": self.module,
                "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
                "latent_factor": self.latent_factor, "size_multiple": self.size_multiple,
                "spatial": self.spatial, "extra": self.extra}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "ComponentSpec":
        cls = _KINDS[d["kind"]]
        return cls(name=d["name"], module=d["module"],
                   inputs=tuple(TensorSpec.from_json(t) for t in d["inputs"]),
                   outputs=tuple(TensorSpec.from_json(t) for t in d["outputs"]),
                   latent_factor=d["latent_factor"], size_multiple=d["size_multiple"],
                   spatial=d["spatial"], extra=dict(d.get("extra", {})))

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


def _pretty(dims: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


class TextEncoderSpec(ComponentSpec):
    """CLIP text encoder: token ids in; SDXL's penultimate hidden states (and the projected pooled
    embedding for text_encoder_2) out."""

    kind = "text_encoder"

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any], with_projection: bool) -> "TextEncoderSpec":
        seq = int(cfg["max_position_embeddings"])
        outputs = [TensorSpec("hidden_states", "float32", ("batch", seq, int(cfg["hidden_size"])))]
        if with_projection:
            outputs.append(TensorSpec("text_embeds", "float32", ("batch", int(cfg["projection_dim"]))))
        return cls(name=name, module=name, inputs=(TensorSpec("input_ids", "int32", ("batch", seq)),),
                   outputs=tuple(outputs), spatial=False, size_multiple=1,
                   extra={"vocab_size": int(cfg["vocab_size"])})

    def dummy_inputs(self, batch: int, height: int, width: int, seed: int = 0, chunks: int = 1) -> dict[str, np.ndarray]:
        # Token ids below the end token (the highest id), a prompt of random length, end, padding.
        rng = np.random.default_rng(seed)
        seq = self.inputs[0].dims[1]
        vocab = self.extra["vocab_size"]
        ids = rng.integers(1, min(vocab, 1 << 16) - 2, size=(batch, seq), dtype=np.int64)
        for row in ids:
            n = int(rng.integers(3, seq - 1))
            row[0], row[n], row[n + 1:] = vocab - 2, vocab - 1, 0
        return {"input_ids": ids.astype(np.int32)}


def _residual(name: str, channels: int, scale: int) -> TensorSpec:
    """A ControlNet residual: [batch, channels] at 1/scale of the latents (dims `latent_height/scale`)."""
    axes = ("latent_height", "latent_width") if scale == 1 else (f"latent_height/{scale}", f"latent_width/{scale}")
    return TensorSpec(name, "float32", ("batch", channels, *axes))


class UNetSpec(ComponentSpec):
    """The denoising U-Net, inputs named as diffusers' UNet2DConditionModel.forward takes them."""

    kind = "unet"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], vae_scale_factor: int, seq_len: int = CHUNK_TOKENS) -> "UNetSpec":
        """encoder_hidden_states has a `sequence` axis: `seq_len` (the text encoders' positions) per prompt chunk."""
        c_in, c_out, ctx = int(cfg["in_channels"]), int(cfg["out_channels"]), int(cfg["cross_attention_dim"])
        time_dim = 6  # micro-conditioning: original (h, w), crop top-left (y, x), target (h, w)
        text_dim = int(cfg["projection_class_embeddings_input_dim"]) - time_dim * int(cfg["addition_time_embed_dim"])
        down = 2 ** (len(cfg["block_out_channels"]) - 1)
        return cls(
            name="unet", module="unet",
            inputs=(TensorSpec("sample", "float32", ("batch", c_in, "latent_height", "latent_width")),
                    TensorSpec("timestep", "float32", ("batch",)),
                    TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", ctx)),
                    TensorSpec("text_embeds", "float32", ("batch", text_dim)),
                    TensorSpec("time_ids", "float32", ("batch", time_dim))),
            outputs=(TensorSpec("out_sample", "float32", ("batch", c_out, "latent_height", "latent_width")),),
            latent_factor=vae_scale_factor, size_multiple=vae_scale_factor * down,
            extra={"downsample": down, "chunk_tokens": seq_len})

    @classmethod
    def with_residuals(cls, unet: "UNetSpec", down: list[tuple[int, int]], mid: tuple[int, int]) -> "UNetSpec":
        """The `unet_controlnet` variant: the U-Net's inputs plus a ControlNet's down residuals and mid
        residual, each (channels, downscale from the latents), in diffusers' order."""
        extra = tuple(_residual(f"down_block_additional_residual_{i}", c, k) for i, (c, k) in enumerate(down))
        return cls(name="unet_controlnet", module="unet", inputs=unet.inputs + extra + (_residual("mid_block_additional_residual", *mid),),
                   outputs=unet.outputs, latent_factor=unet.latent_factor, size_multiple=unet.size_multiple, extra=dict(unet.extra))

    def dummy_inputs(self, batch: int, height: int, width: int, seed: int = 0, chunks: int = 1) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        shapes = self.input_shapes(batch, height, width, chunks)
        time_ids = np.tile(np.array([height, width, 0, 0, height, width], np.float32), (batch, 1))
        feeds = {"sample": rng.standard_normal(shapes["sample"], dtype=np.float32),
                 "timestep": np.full((batch,), float(rng.integers(1, 1000)), np.float32),
                 "encoder_hidden_states": rng.standard_normal(shapes["encoder_hidden_states"], dtype=np.float32)
                 if "encoder_hidden_states" in shapes else None,
                 "text_embeds": rng.standard_normal(shapes["text_embeds"], dtype=np.float32),
                 "time_ids": time_ids}
        feeds = {k: v for k, v in feeds.items() if v is not None and k in shapes}
        for t in self.inputs:  # a variant's extra inputs (ControlNet residuals, unet_shallow's deep_feature): O(1) features
            if t.name not in feeds:
                feeds[t.name] = rng.standard_normal(shapes[t.name], dtype=np.float32)
        return feeds

    @classmethod
    def cache_variants(cls, unet: "UNetSpec", cfg: Mapping[str, Any], branch: int) -> dict[str, "UNetSpec"]:
        """Feature caching's two graphs for `branch` (exporter/cache_branch.py): `unet_deep`, the U-Net
        with the hidden state entering the branch's up-block layer as a second output (deep_feature), and
        `unet_shallow`, the part that runs on cached steps: the U-Net's inputs (encoder_hidden_states only
        where that part has cross-attention) plus deep_feature, out_sample out."""
        from exporter.cache_branch import cache_branch

        b = cache_branch(cfg, branch)
        lat = ("latent_height", "latent_width") if b.scale == 1 else (f"latent_height/{b.scale}", f"latent_width/{b.scale}")
        feature = TensorSpec("deep_feature", "float32", ("batch", b.channels, *lat))
        extra = {**unet.extra, "cache_branch": b.branch, "cache_block": b.block, "cache_layer": b.layer}
        shallow_in = tuple(t for t in unet.inputs if t.name != "encoder_hidden_states" or b.cross_attention)
        common = dict(module="unet", latent_factor=unet.latent_factor, size_multiple=unet.size_multiple)
        return {"unet_deep": cls(name="unet_deep", inputs=unet.inputs, outputs=(*unet.outputs, feature), extra=extra, **common),
                "unet_shallow": cls(name="unet_shallow", inputs=(*shallow_in, feature), outputs=unet.outputs, extra=extra, **common)}


class ControlNetSpec(ComponentSpec):
    """A ControlNet: the U-Net's inputs plus the control image (pixels in [0, 1], as diffusers'
    control_image_processor gives it) and the conditioning scale; the down residuals and the mid
    residual out, already scaled, in diffusers' order (exporter/controlnet.py)."""

    kind = "controlnet"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], unet: UNetSpec, down: list[tuple[int, int]], mid: tuple[int, int]) -> "ControlNetSpec":
        inputs = unet.inputs + (TensorSpec("controlnet_cond", "float32", ("batch", int(cfg.get("conditioning_channels", 3)), "height", "width")),
                                TensorSpec("conditioning_scale", "float32", (1,)))
        outputs = tuple(_residual(f"down_block_res_sample_{i}", c, k) for i, (c, k) in enumerate(down)) + (_residual("mid_block_res_sample", *mid),)
        return cls(name="controlnet", module="controlnet", inputs=inputs, outputs=outputs, latent_factor=unet.latent_factor,
                   size_multiple=unet.size_multiple, extra=dict(unet.extra))

    def dummy_inputs(self, batch: int, height: int, width: int, seed: int = 0, chunks: int = 1) -> dict[str, np.ndarray]:
        base = UNetSpec(name=self.name, module="unet", inputs=self.inputs[:5], outputs=(), latent_factor=self.latent_factor,
                        size_multiple=self.size_multiple, extra=self.extra).dummy_inputs(batch, height, width, seed, chunks)
        rng = np.random.default_rng(seed + 1)
        shape = self.input_shapes(batch, height, width, chunks)["controlnet_cond"]
        return {**base, "controlnet_cond": rng.random(shape, dtype=np.float32), "conditioning_scale": np.array([0.8], np.float32)}


class VaeDecoderSpec(ComponentSpec):
    """VAE decoder: latents already divided by the scaling factor in (as `vae.decode` takes them),
    the image in [-1, 1] out."""

    kind = "vae_decoder"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], vae_scale_factor: int) -> "VaeDecoderSpec":
        return cls(name="vae_decoder", module="vae",
                   inputs=(TensorSpec("latent_sample", "float32", ("batch", int(cfg["latent_channels"]), "latent_height", "latent_width")),),
                   outputs=(TensorSpec("sample", "float32", ("batch", int(cfg["out_channels"]), "height", "width")),),
                   latent_factor=vae_scale_factor, size_multiple=vae_scale_factor,
                   extra={"scaling_factor": float(cfg.get("scaling_factor", 0.18215))})

    def dummy_inputs(self, batch: int, height: int, width: int, seed: int = 0, chunks: int = 1) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        shape = self.input_shapes(batch, height, width)["latent_sample"]
        return {"latent_sample": rng.standard_normal(shape, dtype=np.float32) / np.float32(self.extra["scaling_factor"])}


class VaeEncoderSpec(ComponentSpec):
    """VAE encoder: an image in [-1, 1] in; the latent distribution's mean and log-variance out."""

    kind = "vae_encoder"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], vae_scale_factor: int) -> "VaeEncoderSpec":
        return cls(name="vae_encoder", module="vae",
                   inputs=(TensorSpec("sample", "float32", ("batch", int(cfg["in_channels"]), "height", "width")),),
                   outputs=(TensorSpec("latent_parameters", "float32", ("batch", 2 * int(cfg["latent_channels"]), "latent_height", "latent_width")),),
                   latent_factor=vae_scale_factor, size_multiple=vae_scale_factor,
                   extra={"scaling_factor": float(cfg.get("scaling_factor", 0.18215))})

    def dummy_inputs(self, batch: int, height: int, width: int, seed: int = 0, chunks: int = 1) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        shape = self.input_shapes(batch, height, width)["sample"]
        return {"sample": rng.uniform(-1, 1, shape).astype(np.float32)}


_KINDS: dict[str, type[ComponentSpec]] = {c.kind: c for c in (TextEncoderSpec, UNetSpec, VaeDecoderSpec, VaeEncoderSpec, ControlNetSpec)}


def check_tile(tile: object, height: int | None = None, width: int | None = None, multiple: int = 8) -> None:
    """A tile size in pixels: a positive multiple of `multiple` (the VAE's latent factor) and, where
    the image's height and width are given, not larger than either. Raises ValueError with the
    reason, to follow the name of what set it ("--vae-tile", "field vae.tile")."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < multiple or tile % multiple:
        raise ValueError(f"must be a positive multiple of {multiple} px (got {tile!r})")
    if height is not None and width is not None and (tile > height or tile > width):
        raise ValueError(f"must not be larger than the image ({tile} px > {width}x{height} px)")


def specs_from_configs(configs: Mapping[str, Mapping[str, Any]], cache_branch: int = 0) -> dict[str, ComponentSpec]:
    """Every component's spec, from the pipeline's configs (text_encoder, text_encoder_2, unet, vae);
    the feature-caching pair (unet_deep, unet_shallow) split at `cache_branch`."""
    f = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    unet = UNetSpec.from_config(configs["unet"], f, int(configs["text_encoder"]["max_position_embeddings"]))
    specs: dict[str, ComponentSpec] = {
        "text_encoder": TextEncoderSpec.from_config("text_encoder", configs["text_encoder"], with_projection=False),
        "text_encoder_2": TextEncoderSpec.from_config("text_encoder_2", configs["text_encoder_2"], with_projection=True),
        "unet": unet,
        "vae_decoder": VaeDecoderSpec.from_config(configs["vae"], f),
        "vae_encoder": VaeEncoderSpec.from_config(configs["vae"], f),
        **UNetSpec.cache_variants(unet, configs["unet"], cache_branch),
    }
    if "controlnet" in configs:  # export --controlnet: the ControlNet and the U-Net taking its residuals
        from exporter.controlnet import residual_layout

        unet = specs["unet"]
        assert isinstance(unet, UNetSpec)
        c_down, c_mid = residual_layout(configs["controlnet"])
        u_down, u_mid = residual_layout(configs["unet"])
        specs["controlnet"] = ControlNetSpec.from_config(configs["controlnet"], unet, [(r.channels, r.scale) for r in c_down],
                                                         (c_mid.channels, c_mid.scale))
        specs["unet_controlnet"] = UNetSpec.with_residuals(unet, [(r.channels, r.scale) for r in u_down], (u_mid.channels, u_mid.scale))
    return specs


def default_range(spec: ComponentSpec, batch: int, height: int, width: int,
                  max_prompt_chunks: int = DEFAULT_PROMPT_CHUNKS) -> ShapeRange:
    """The shape range an export claims: batch 1..MAX_BATCH, each side from half to twice the export
    size (at most 2048 px, in the spec's granularity), opt at the export size; a graph with a
    `sequence` axis takes 1..max_prompt_chunks prompt chunks (opt 1: most prompts fit one)."""
    m = spec.size_multiple

    def side(v: int) -> tuple[int, int, int]:
        return (max(m, (v // 2) // m * m), v, max(v, min(2048, 2 * v) // m * m))

    chunks = (1, 1, max_prompt_chunks) if spec.has_sequence else None
    return ShapeRange((1, batch, max(MAX_BATCH, batch)), side(height), side(width), chunks)


def parse_components(names: tuple[str, ...] | list[str] | None, default: tuple[str, ...] = DEFAULT_COMPONENTS) -> list[str]:
    """Validate a --components list (comma-separated or repeated)."""
    if not names:
        return list(default)
    out: list[str] = []
    for item in names:
        for n in str(item).split(","):
            n = n.strip()
            if not n:
                continue
            if n not in COMPONENTS + VARIANT_COMPONENTS:
                raise UsageError(f"unknown component {n!r}; expected one of {', '.join(COMPONENTS + VARIANT_COMPONENTS)}")
            if n not in out:
                out.append(n)
    return out
