"""Process-wide settings of a command run, set once from its common options (koala_trt/commands/
common.py: --no-progress, --threads) and read where the work happens, so every long-running command
honours them alike without threading them through each call.

- progress: whether progress bars are drawn (tqdm's own `disable=None` still hides them where stderr
  is not a terminal).
- threads: CPU threads for ONNX Runtime sessions made without an explicit count (koala_core.ort) and
  for PyTorch (torch.set_num_threads, or OMP_NUM_THREADS before torch is first imported)."""

from __future__ import annotations

import os
import sys

_progress = True
_threads: int | None = None
_saved: tuple[int | None, str | None] | None = None  # torch's thread count and OMP_NUM_THREADS before --threads


def set_progress(enabled: bool) -> None:
    global _progress
    _progress = bool(enabled)


def progress_disabled() -> bool | None:
    """tqdm's `disable=`: True when --no-progress was given, else None (tqdm decides by the terminal)."""
    return None if _progress else True


def progress_enabled() -> bool:
    return _progress


def set_threads(threads: int | None) -> None:
    """--threads N: the default for ONNX Runtime sessions and PyTorch's intra-op pool. None (the option
    left out) restores what an earlier command of this process changed (commands run in-process in tests)."""
    global _threads, _saved
    _threads = threads
    torch = sys.modules.get("torch")
    if threads is None:
        if _saved is not None:
            torch_threads, omp = _saved
            _saved = None
            if torch is not None and torch_threads is not None:
                torch.set_num_threads(torch_threads)
            if omp is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = omp
        return
    if _saved is None:
        _saved = (torch.get_num_threads() if torch is not None else None, os.environ.get("OMP_NUM_THREADS"))
    if torch is not None:
        torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # torch reads it when it starts its thread pool


def default_threads() -> int | None:
    return _threads
