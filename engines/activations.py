"""Activation memory of one forward pass, measured on PyTorch's meta device (nothing is allocated).

The component's module is built on the meta device and run once at the requested shapes under a
dispatch mode that sees every tensor an operator creates and when its last reference dies. The
peak of the bytes held by live intermediate tensors is what an executor that frees each tensor
after its last use (PyTorch eager; TensorRT's activation planner with buffer reuse) needs at once.
Weights, buffers and the graph inputs are not counted here (the planner counts them apart).

Attention: a fused attention kernel (flash attention, TensorRT's fused multi-head attention)
never materializes the score matrix. Calls to `scaled_dot_product_attention` with a head size up
to FUSED_ATTENTION_MAX_HEAD_DIM are counted as fused (only their output is allocated); larger heads,
such as the SDXL VAE's single 512-wide head, run PyTorch's math path here and so count their full
batch x heads x tokens x tokens score matrices: the conservative assumption.

Imports torch: call it only from functions that need it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

FUSED_ATTENTION_MAX_HEAD_DIM = 128


@dataclass(frozen=True)
class ActivationTrace:
    peak_bytes: int
    ops: int
    peak_op: str  # the operator whose output set the peak, and that output's shape
    fused_attention_calls: int
    unfused_attention_calls: int


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of storages created by operators while any tensor still refers to them."""

    def __init__(self, external: set[int]) -> None:
        super().__init__()
        self.external = external
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = self.peak = self.ops = 0
        self.peak_op = ""
        self._op = ""

    def _drop(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.sizes.pop(key)

    def _track(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            return
        key = _key(t)
        if key in self.external:
            return
        if key in self.refs:
            self.refs[key] += 1
        else:
            nbytes = t.untyped_storage().nbytes()
            self.refs[key], self.sizes[key] = 1, nbytes
            self.current += nbytes
            if self.current > self.peak:
                self.peak, self.peak_op = self.current, f"{self._op} -> {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
        weakref.finalize(t, self._drop, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self._op = str(func).replace("aten.", "").replace(".default", "")
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for o in out if isinstance(out, (tuple, list)) else (out,):
            self._track(o)
        return out


class _FusedAttention(TorchFunctionMode):
    """Counts scaled_dot_product_attention as one fused kernel (its output only) for small heads."""

    def __init__(self) -> None:
        super().__init__()
        self.fused = self.unfused = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, v = args[0], args[2] if len(args) > 2 else kwargs["value"]
            if q.shape[-1] <= FUSED_ATTENTION_MAX_HEAD_DIM:
                self.fused += 1
                return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
            self.unfused += 1
        return func(*args, **kwargs)


def trace_activations(module: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> ActivationTrace:
    """Peak bytes of live intermediate tensors for `module(**inputs)`; module and inputs on meta."""
    external = {_key(p) for p in module.parameters()} | {_key(b) for b in module.buffers()}
    external |= {_key(t) for t in inputs.values()}
    live, attention = _LiveBytes(external), _FusedAttention()
    with torch.no_grad(), attention, live:
        out = module(**inputs)
    del out
    return ActivationTrace(live.peak, live.ops, live.peak_op, attention.fused, attention.unfused)


def meta_inputs(spec: Any, batch: int, height: int, width: int, float_dtype: torch.dtype,
                chunks: int = 1) -> dict[str, torch.Tensor]:
    """Empty meta tensors shaped as `spec`'s inputs (`chunks` prompt chunks on a `sequence` axis);
    floating inputs in the compute dtype."""
    out = {}
    for name, shape in spec.input_shapes(batch, height, width, chunks).items():
        declared = spec.input(name).dtype
        dtype = float_dtype if declared.startswith("float") else getattr(torch, declared)
        out[name] = torch.empty(shape, dtype=dtype, device="meta")
    return out
