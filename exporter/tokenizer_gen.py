"""A small CLIP-compatible BPE vocabulary for the random-weight presets (no download needed).

CLIP's vocabulary layout (openai/clip-vit-large-patch14, laion bigG): the 256 byte-level symbols, the
same 256 with the end-of-word marker `</w>`, one entry per BPE merge in merge order, then
`<|startoftext|>` and `<|endoftext|>` last, so that the end token has the highest id (CLIP's legacy
pooling takes the argmax of the ids). We learn the merges with Hugging Face `tokenizers`' BPE
trainer on a small English corpus and lay the vocabulary out the same way, so transformers'
`CLIPTokenizer` (and the `tokenizers` runtime the sampler uses) load it as they load CLIP's own.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
# CLIP's pre-tokenization pattern (openai/CLIP simple_tokenizer.py).
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in CLIP's vocabulary order:
    the printable bytes first (so `!` is id 0, tokenizer_2's pad id), then the remapped others."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def corpus_lines() -> list[str]:
    """The text the merges are learned from: the shipped calibration prompts plus a word list."""
    lines = []
    for name in ("prompts.txt", "heldout_prompts.txt"):
        try:
            lines += resources.files("calibration").joinpath(name).read_text(encoding="utf-8").splitlines()
        except (FileNotFoundError, ModuleNotFoundError):
            pass
    lines += resources.files("exporter").joinpath("configs/tokenizer_corpus.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


def learn_merges(lines: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Learn up to `num_merges` BPE merges over CLIP-style words (lower-cased, byte-level, `</w>`)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    alphabet = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(end_of_word_suffix=EOW))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(alphabet) + num_merges,
        min_frequency=2,
        initial_alphabet=alphabet,
        end_of_word_suffix=EOW,
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return merges[:num_merges]


def write_clip_tokenizer(out_dir: Path, merges: list[tuple[str, str]], pad_token: str) -> Path:
    """Write vocab.json and merges.txt in CLIP's layout, then let transformers save the full tokenizer."""
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    vocab_list = alphabet + [c + EOW for c in alphabet]
    seen = set(vocab_list)
    for a, b in merges:
        merged = a + b
        if merged not in seen:
            seen.add(merged)
            vocab_list.append(merged)
    vocab_list += [BOS, EOS]
    raw = out_dir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}, ensure_ascii=False), encoding="utf-8")
    (raw / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=str(raw / "vocab.json"), merges=str(raw / "merges.txt"),
        bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad_token, model_max_length=77,
    )
    tokenizer.save_pretrained(str(out_dir))
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    return out_dir


@lru_cache(maxsize=None)
def preset_tokenizers(num_merges: int = 2000) -> tuple[Path, Path]:
    """Generate (once per process) the two SDXL tokenizers: pad `<|endoftext|>` and pad `!`."""
    import atexit
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="koala-trt-tokenizers-"))
    atexit.register(shutil.rmtree, root, True)  # a process's scratch copy; artifacts get their own copy
    merges = learn_merges(corpus_lines(), num_merges)
    return (
        write_clip_tokenizer(root / "tokenizer", merges, pad_token=EOS),
        write_clip_tokenizer(root / "tokenizer_2", merges, pad_token="!"),
    )


def vocab_size(tokenizer_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
