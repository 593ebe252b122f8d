"""CLIP tokenization for the sampler with Hugging Face `tokenizers` (no transformers, no torch).

SDXL's pipeline calls each CLIPTokenizer as
    tokenizer(prompt, padding="max_length", max_length=model_max_length, truncation=True)
i.e. <|startoftext|> + at most 75 BPE tokens + <|endoftext|>, then the tokenizer's pad token up to
77 (<|endoftext|> for CLIP ViT-L, "!" for OpenCLIP bigG). `ClipTokenizer` does the same from the
tokenizer.json (the BPE model, normalizer and post-processor) and tokenizer_config.json (pad
token, model_max_length) that `koala-trt export` copies into the artifacts folder.

Prompts longer than that are chunked as ComfyUI and compel do (`chunk_prompts`): the ids without
start/end token in chunks of 75, each <|startoftext|> + chunk + <|endoftext|> + padding to 77
(exporter.specs.prompt_chunk_ids); the sampler encodes every chunk and joins them on the sequence axis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporter.specs import prompt_chunk_count, prompt_chunk_ids
from koala_core.errors import UsageError


@dataclass(frozen=True)
class Tokenized:
    ids: np.ndarray  # int32 [batch, max_length]
    truncated: tuple[str, ...]  # per prompt: the text that did not fit ("" when everything fit)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "...", ...} as transformers writes AddedToken
        return value.get("content")
    return value


class ClipTokenizer:
    """A CLIP tokenizer folder as SDXL's pipeline uses it: pad/truncate to `max_length` ids."""

    def __init__(self, folder: Path | str, max_length: int | None = None) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise UsageError(f"missing tokenizer file {path} (re-export the artifacts with `koala-trt export`)")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception type for bad JSON
            raise UsageError(f"{path} is not a valid tokenizer.json ({str(e).splitlines()[0][:160]})") from None
        config: dict[str, Any] = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UsageError(f"{cfg_path} is corrupt: {e}") from None
        self.folder = folder
        self.max_length = int(max_length or config.get("model_max_length", 77))
        self.bos, self.eos = _token_text(config.get("bos_token")) or "<|startoftext|>", _token_text(config.get("eos_token")) or "<|endoftext|>"
        pad = _token_text(config.get("pad_token"))
        if pad is None:
            padding = json.loads(path.read_text(encoding="utf-8")).get("padding") or {}
            pad = padding.get("pad_token", self.eos)
        self.pad_token = pad
        pad_id = self._tok.token_to_id(pad)
        eos_id = self._tok.token_to_id(self.eos)
        bos_id = self._tok.token_to_id(self.bos)
        if pad_id is None or eos_id is None or bos_id is None:
            raise UsageError(f"{path}: pad token {pad!r}, start token {self.bos!r} or end token {self.eos!r} is not in the vocabulary")
        self.pad_id, self.eos_id, self.bos_id = pad_id, eos_id, bos_id
        # Two configured copies: one pads/truncates as the pipeline does, one sees the whole prompt.
        self._full = Tokenizer.from_str(self._tok.to_str())
        self._full.no_truncation()
        self._full.no_padding()
        self._tok.enable_truncation(max_length=self.max_length)  # room for <|startoftext|> and <|endoftext|> is kept
        self._tok.enable_padding(length=self.max_length, pad_id=pad_id, pad_token=pad)

    def __call__(self, prompts: list[str]) -> Tokenized:
        # One encode per prompt: a CFG batch holds one or two, too few for encode_batch's thread pool to pay.
        ids = np.array([self._tok.encode(p).ids for p in prompts], dtype=np.int32)
        truncated = []
        for prompt in prompts:
            full = self._full.encode(prompt).ids
            # As diffusers reports it: the tokens between position max_length-1 and the final end token.
            dropped = self._full.decode(full[self.max_length - 1:-1]) if len(full) > self.max_length else ""
            truncated.append(" ".join(dropped.replace("</w>", " ").split()))
        return Tokenized(ids, tuple(truncated))

    def token_ids(self, prompt: str) -> list[int]:
        """The prompt's BPE ids, whole, without start and end token."""
        return list(self._full.encode(prompt, add_special_tokens=False).ids)

    def chunk_count(self, prompt: str) -> int:
        return prompt_chunk_count(len(self.token_ids(prompt)), self.max_length)

    def chunked(self, prompts: list[str], chunks: int) -> np.ndarray:
        """int32 [prompts, chunks, max_length]: each prompt in `chunks` chunks (empty ones past its end)."""
        return np.stack([prompt_chunk_ids(self.token_ids(p), chunks, self.bos_id, self.eos_id, self.pad_id, self.max_length)
                         for p in prompts])


def prompt_tokens(tokenizers: tuple[ClipTokenizer, ...] | list[ClipTokenizer], prompts: list[str]) -> int:
    """The longest prompt's token count (without start/end token), under either tokenizer."""
    return max(len(t.token_ids(p)) for t in tokenizers for p in prompts)


def prompt_chunks(tokenizers: tuple[ClipTokenizer, ...] | list[ClipTokenizer], prompts: list[str]) -> int:
    """The chunk count a set of prompts encodes at: the longest prompt's, under either tokenizer."""
    return max(t.chunk_count(p) for t in tokenizers for p in prompts)


def chunk_prompts(tokenizers: tuple[ClipTokenizer, ...] | list[ClipTokenizer], prompts: list[str],
                  chunks: int | None = None) -> tuple[np.ndarray, ...]:
    """Per tokenizer: int32 [prompts, chunks, max_length], every prompt padded with empty chunks to
    `chunks` (default: the longest prompt's count), as compel pads a shorter negative prompt."""
    k = prompt_chunks(tokenizers, prompts) if chunks is None else chunks
    return tuple(t.chunked(prompts, k) for t in tokenizers)
