"""Inputs to run the graphs on for range analysis: real token ids from prompts, U-Net
inputs from a calibration set, or spec dummy inputs where nothing better is given."""

from __future__ import annotations

from typing import Any

import numpy as np

from exporter.manifest import Manifest
from exporter.specs import ComponentSpec


def token_ids(manifest: Manifest, component: str, prompts: list[str]) -> dict[str, np.ndarray]:
    """input_ids for `prompts` with the folder's tokenizer for `component` (padded to the spec's
    sequence length, as the pipeline tokenizes)."""
    from transformers import CLIPTokenizer

    spec = manifest.spec(component)
    seq = int(spec.inputs[0].dims[1])
    tok_dir = manifest.root / manifest.view.tokenizers[0 if component == "text_encoder" else 1]
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    ids = tok(prompts, padding="max_length", max_length=seq, truncation=True, return_tensors="np").input_ids
    return {spec.inputs[0].name: ids.astype(np.int32)}


def spread(items: list[Any], n: int) -> list[Any]:
    """`n` items spread evenly over `items` (first and last included)."""
    if n >= len(items):
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def unet_samples(calib: Any, spec: ComponentSpec, limit: int) -> list[dict[str, np.ndarray]]:
    """Up to `limit` U-Net feeds from a calibration set, spread over prompts and denoising steps
    (the early, high-noise steps carry the largest activations)."""
    shards = list(calib.view.shards)
    entries = spread(shards, max(1, min(len(shards), limit)))
    per = max(1, -(-limit // len(entries)))
    out: list[dict[str, np.ndarray]] = []
    from calibration.dataset import step_feeds

    for entry in entries:
        arrays = calib.load_shard(entry, spec)
        steps = spread(list(range(arrays["sample"].shape[0])), per)
        out += [step_feeds(arrays, s) for s in steps]
    return out[:limit]
