"""Prompt embeddings of any length from a PyTorch SDXL pipeline, chunked as the numpy sampler chunks
them (exporter.specs.prompt_chunk_ids: ComfyUI's and compel's convention), for the diffusers calls
that stand as references (`calibrate`'s capture, `validate`'s trajectories, the tests).

diffusers' own `encode_prompt` truncates at 77 tokens; these are passed as its `prompt_embeds`,
`pooled_prompt_embeds`, `negative_prompt_embeds` and `negative_pooled_prompt_embeds` instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from exporter.specs import prompt_chunk_count, prompt_chunk_ids


def encode_chunked(pipe: Any, prompts: list[str], chunks: int | None = None) -> tuple[Any, Any]:
    """(hidden [prompts, 77 x chunks, features of both encoders], pooled [prompts, projection]) with
    the pipeline's tokenizers and encoders: each chunk's penultimate hidden states of both encoders
    joined on the feature axis, the chunks on the sequence axis; pooled from text_encoder_2's first
    chunk. `chunks` defaults to the longest prompt's count (shorter prompts get empty chunks)."""
    import torch

    pairs = ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
    raw = [[tok(p, add_special_tokens=False, truncation=False, verbose=False).input_ids for p in prompts] for tok, _ in pairs]
    seqs = [int(enc.config.max_position_embeddings) for _, enc in pairs]
    k = chunks or max(prompt_chunk_count(len(ids), seq) for ids_list, seq in zip(raw, seqs) for ids in ids_list)
    hidden, pooled = [], None
    for (tok, enc), ids_list, seq in zip(pairs, raw, seqs):
        ids = np.stack([prompt_chunk_ids(ids, k, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, seq) for ids in ids_list])
        with torch.no_grad():
            out = enc(torch.from_numpy(ids.reshape(-1, seq)).long().to(enc.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2].reshape(len(prompts), k * seq, -1))
        if enc is pipe.text_encoder_2:
            pooled = out[0].reshape(len(prompts), k, -1)[:, 0]
    return torch.cat(hidden, dim=-1), pooled


def pipeline_embeds(pipe: Any, prompt: str, negative_prompt: str = "") -> dict[str, Any]:
    """Keyword arguments for `pipe(...)` in place of prompt/negative_prompt: the chunked embeddings of
    both, the negative prompt padded to the positive's chunk count (or the other way round); an empty
    negative prompt gives zeros when the pipeline's force_zeros_for_empty_prompt says so."""
    import torch

    zeros = not negative_prompt and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))
    if zeros:
        h, p = encode_chunked(pipe, [prompt])
        return {"prompt_embeds": h, "pooled_prompt_embeds": p,
                "negative_prompt_embeds": torch.zeros_like(h), "negative_pooled_prompt_embeds": torch.zeros_like(p)}
    h, p = encode_chunked(pipe, [negative_prompt, prompt])
    return {"prompt_embeds": h[1:], "pooled_prompt_embeds": p[1:],
            "negative_prompt_embeds": h[:1], "negative_pooled_prompt_embeds": p[:1]}
