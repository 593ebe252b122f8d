"""LoRA adapters fused into the weights: W' = W + scale x (alpha / rank) x B @ A, per layer.

This is what diffusers' `load_lora_weights` + `fuse_lora(lora_scale=scale)` computes (PEFT's
`get_delta_weight`; alpha = rank when the file stores none). Two file layouts, both safetensors:

- diffusers/PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (optional `<module>.alpha`),
  text encoders under `text_encoder.` and `text_encoder_2.`;
- kohya: `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, text encoders
  under `lora_te_`/`lora_te1_` and `lora_te2_`.

Layers are matched to a module's own Linear/Conv layers by path, so the same deltas are added to a
PyTorch module at export (`fuse`) and to an exported graph's initializers (calibration/lora_patch.py).
numpy + safetensors only, so patching a graph never imports torch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from koala_core.errors import UsageError

LORA_MODULES = ("unet", "text_encoder", "text_encoder_2")
PEFT_PREFIX = {f"{m}.": m for m in LORA_MODULES}
KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
PEFT_PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "alpha": "alpha"}
KOHYA_PARTS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
SHOW_KEYS = 3  # unmatched keys an error names


@dataclass(frozen=True)
class LoraArg:
    """One `--lora FILE[:SCALE]`."""

    path: Path
    scale: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.path}:{self.scale:g}"


def parse_lora_arg(text: str) -> LoraArg:
    """`FILE[:SCALE]`: the part after the last ':' is the scale when FILE itself is not a file."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and not Path(text).is_file():
        try:
            scale = float(tail)
        except ValueError:
            raise UsageError(f"--lora {text}: scale {tail!r} is not a number (FILE or FILE:SCALE, e.g. style.safetensors:0.8)") from None
        if not math.isfinite(scale):
            raise UsageError(f"--lora {text}: scale {tail!r} is not a finite number")
        path = head
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--lora {path}: no such file")
    return LoraArg(p, scale)


@dataclass
class LoraLayer:
    """One adapted layer: down (A, [rank, in, *k]) and up (B, [out, rank, *1]) as float32."""

    A: np.ndarray | None = None
    B: np.ndarray | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        assert self.A is not None
        return int(self.A.shape[0])

    def delta(self, scale: float, shape: tuple[int, ...]) -> np.ndarray:
        """scale x (alpha / rank) x B @ A, in the layer weight's own shape ([out, in, *k]), float32."""
        assert self.A is not None and self.B is not None
        factor = np.float32(scale * (self.rank if self.alpha is None else self.alpha) / self.rank)
        d = (self.B.reshape(self.B.shape[0], -1) @ self.A.reshape(self.rank, -1)) * factor
        if d.size != math.prod(shape):
            raise UsageError(f"LoRA layer {self.keys[0]}: B @ A is {list(d.shape)}, the layer's weight is {list(shape)}")
        return d.reshape(shape).astype(np.float32, copy=False)


@dataclass
class Adapter:
    """A LoRA file read and grouped by module and layer path (the module's own path, no prefix)."""

    arg: LoraArg
    sha256: str
    layers: dict[str, dict[str, LoraLayer]]  # module -> layer path -> layer
    kohya: bool

    def counts(self) -> dict[str, int]:
        return {m: len(v) for m, v in self.layers.items() if v}

    def record(self) -> dict[str, Any]:
        """The manifest's entry for this adapter."""
        return {"file": self.arg.path.name, "sha256": self.sha256, "scale": self.arg.scale,
                "format": "kohya" if self.kohya else "peft", "layers": self.counts()}


def read_adapter(arg: LoraArg) -> Adapter:
    """Read a LoRA safetensors file into layers; a key of neither layout is an error naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        import ml_dtypes  # noqa: F401  (gives numpy the bfloat16 that bf16-saved adapters use; onnx depends on it)
    except ImportError:
        pass
    try:
        tensors: dict[str, np.ndarray] = {}
        with safe_open(str(arg.path), framework="numpy") as f:
            for k in f.keys():
                tensors[k] = np.asarray(f.get_tensor(k), dtype=np.float32)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise UsageError(f"--lora {arg.path}: not a safetensors file ({str(e).splitlines()[0][:120]})") from None
    if not tensors:
        raise UsageError(f"--lora {arg.path}: holds no tensors")
    kohya = all(k.startswith(tuple(KOHYA_PREFIX)) for k in tensors)
    prefixes, parts = (KOHYA_PREFIX, KOHYA_PARTS) if kohya else (PEFT_PREFIX, PEFT_PARTS)
    layers: dict[str, dict[str, LoraLayer]] = {m: {} for m in LORA_MODULES}
    bad: list[str] = []
    for key in sorted(tensors):
        module = next((m for p, m in prefixes.items() if key.startswith(p)), None)
        part = next((parts[s] for s in parts if key.endswith("." + s)), None)
        if module is None or part is None:
            bad.append(key)
            continue
        prefix = next(p for p in prefixes if key.startswith(p))
        name = key[len(prefix):-len(next(s for s in parts if key.endswith("." + s))) - 1]
        layer = layers[module].setdefault(name, LoraLayer())
        layer.keys.append(key)
        t = tensors[key]
        if part == "alpha":
            layer.alpha = float(t.reshape(-1)[0])
        else:
            setattr(layer, part, t)
    if bad:
        raise UsageError(_unmatched(arg, bad, "are not LoRA keys of the diffusers/PEFT or kohya layout"))
    for module, by_name in layers.items():
        for name, layer in by_name.items():
            if layer.A is None or layer.B is None:
                raise UsageError(f"--lora {arg.path}: {layer.keys[0]} has no matching {'up' if layer.B is None else 'down'} weight")
    return Adapter(arg, _sha256(arg.path), layers, kohya)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _unmatched(arg: LoraArg, keys: list[str], why: str) -> str:
    more = f" and {len(keys) - SHOW_KEYS} more" if len(keys) > SHOW_KEYS else ""
    return f"--lora {arg.path}: {len(keys)} key(s) {why}: {', '.join(keys[:SHOW_KEYS])}{more}"


def resolve_layers(adapter: Adapter, module: str, weights: dict[str, tuple[int, ...]]) -> dict[str, LoraLayer]:
    """The adapter's layers for `module`, keyed by the weight parameter each one adapts
    (`<layer path>.weight`); `weights` maps a module's Linear/Conv weight names to their shapes.
    Kohya names (dots as underscores) are matched against the flattened paths; a leading
    `text_model.` (older transformers' CLIP nesting) is dropped as diffusers does. Layers that
    match no weight raise, naming the first few keys."""
    flat = {n[: -len(".weight")].replace(".", "_"): n for n in weights}
    out: dict[str, LoraLayer] = {}
    missing: list[str] = []
    for name, layer in adapter.layers.get(module, {}).items():
        candidates = [name, name.removeprefix("text_model.")] if not adapter.kohya else []
        target = next((c + ".weight" for c in candidates if c + ".weight" in weights), None)
        if adapter.kohya:
            target = flat.get(name) or flat.get(name.removeprefix("text_model_"))
        if target is None:
            missing.extend(k for k in layer.keys if not k.endswith("alpha"))
            continue
        out[target] = layer
    if missing:
        raise UsageError(_unmatched(adapter.arg, sorted(missing), f"match no layer of the {module}"))
    return out


def layer_weights(model: Any) -> dict[str, tuple[int, ...]]:
    """name -> shape of every Linear/Conv weight of a PyTorch module (a meta-device one will do)."""
    import torch

    return {f"{n}.weight": tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) and n}


def check_adapters(adapters: Iterable[Adapter], weights: dict[str, dict[str, tuple[int, ...]]]) -> None:
    """Every layer of every adapter matches a weight of its module (`weights`: module -> name -> shape),
    with B @ A of that weight's shape; raises on the first that does not. Cheap: no deltas kept."""
    for a in adapters:
        for module, by_name in a.layers.items():
            if not by_name:
                continue
            if module not in weights:
                raise UsageError(_unmatched(a.arg, sorted(k for lay in by_name.values() for k in lay.keys),
                                            f"adapt the {module}, which this export does not include"))
            for target, layer in resolve_layers(a, module, weights[module]).items():
                shape = weights[module][target]
                assert layer.A is not None and layer.B is not None
                if (layer.B.shape[0], math.prod(layer.A.shape[1:])) != (shape[0], math.prod(shape[1:])) or layer.B.shape[1] != layer.rank:
                    raise UsageError(f"--lora {a.arg.path}: {layer.keys[0]} is [{layer.B.shape[0]} x {layer.rank}] @ "
                                     f"{list(layer.A.shape)}, the {module}'s {target} is {list(shape)}")


def fuse(model: Any, module: str, adapters: Iterable[Adapter]) -> int:
    """Add every adapter's deltas for `module` to `model`'s weights in place, in order; the number
    of weights changed."""
    import torch

    weights = layer_weights(model)
    params = dict(model.named_parameters())
    touched: set[str] = set()
    with torch.no_grad():
        for a in adapters:
            for target, layer in resolve_layers(a, module, weights).items():
                p = params[target]
                p.add_(torch.from_numpy(layer.delta(a.arg.scale, tuple(p.shape))))
                touched.add(target)
    return len(touched)
