"""The inputs every component is validated on, at the artifact's real shapes (--height/--width, the
spec's 77 tokens per prompt chunk):

- random: the spec's dummy inputs (`ComponentSpec.dummy_inputs`) with fresh seeds: values a real run
  never produces, so a graph that only works along real trajectories (a swapped or ignored input)
  still shows;
- prompts: what the pipeline really feeds: token ids of the prompts for the text encoders, the
  U-Net's inputs recorded along the PyTorch pipeline's denoising trajectories (encoder states of the
  real text encoders, noisy latents, timesteps, micro-conditioning; the CFG batch), and the final
  latents of those trajectories for the VAE decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exporter.specs import ComponentSpec, ShapeRange


@dataclass
class InputSet:
    kind: str  # "random" | "prompts"
    description: str
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)


def batch_for(component: str, shape_range: ShapeRange | None) -> int:
    """The batch the random inputs use: the U-Net's CFG batch (2), 1 for the others, inside the range."""
    want = 2 if component == "unet" else 1
    if shape_range is None:
        return want
    return int(min(max(want, shape_range.batch[0]), shape_range.batch[2]))


def random_inputs(spec: ComponentSpec, batch: int, height: int, width: int, samples: int, seed: int) -> InputSet:
    feeds = [spec.dummy_inputs(batch, height, width, seed=seed + i) for i in range(samples)]
    return InputSet("random", f"{samples} x spec dummy inputs (seeds {seed}..{seed + samples - 1}), batch {batch}", feeds)


def token_inputs(tokenizer_dir: Any, spec: ComponentSpec, prompts: list[str]) -> InputSet:
    """input_ids of each prompt chunk (batch 1), chunked and padded to the spec's sequence length as
    the sampler does (a prompt over 75 tokens gives one feed per chunk)."""
    from sampler.tokenize import ClipTokenizer

    seq = int(spec.inputs[0].dims[1])
    tok = ClipTokenizer(tokenizer_dir, max_length=seq)
    feeds = [{spec.inputs[0].name: row[None]} for p in prompts for row in tok.chunked([p], tok.chunk_count(p))[0]]
    return InputSet("prompts", f"token ids of {len(prompts)} prompts ({len(feeds)} chunks of {seq} tokens)", feeds)

