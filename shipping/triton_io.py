"""How a component's spec maps onto a Triton model's inputs and outputs, shared by the repository
writer (config.pbtxt) and the Python-backend model that calls the components (model.py), so the
two cannot disagree. numpy only.

Batching rule: every tensor of every KOALA component has the symbolic `batch` as its first dim,
so each component model gets `max_batch_size` > 0 and `dynamic_batching`: Triton then owns dim 0
and config dims list the rest (-1 for symbolic dims). A tensor whose only dim is the batch
(the U-Net's `timestep`) is declared `dims: [1]` with `reshape: { shape: [] }`; the caller sends it
as [B, 1] and the model sees [B]. A spec whose tensors do not all start with `batch` gets
`max_batch_size: 0` and its full dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporter.specs import ComponentSpec, TensorSpec

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16",
                 "int32": "TYPE_INT32", "int64": "TYPE_INT64", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


@dataclass(frozen=True)
class TritonTensor:
    name: str
    data_type: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None  # None: no reshape; (): to a scalar per batch item


def batchable(spec: ComponentSpec) -> bool:
    """Can Triton batch this component along dim 0? (all inputs and outputs start with `batch`)"""
    return all(t.dims and t.dims[0] == "batch" for t in (*spec.inputs, *spec.outputs))


def triton_tensor(t: TensorSpec, batched: bool) -> TritonTensor:
    if t.dtype not in TRITON_DTYPES:
        raise ValueError(f"{t.name}: dtype {t.dtype} has no Triton equivalent")
    dims = tuple(d if isinstance(d, int) else -1 for d in t.dims)
    if not batched:
        return TritonTensor(t.name, TRITON_DTYPES[t.dtype], dims, None)
    rest = dims[1:]
    return TritonTensor(t.name, TRITON_DTYPES[t.dtype], rest or (1,), None if rest else ())


def to_triton(t: TensorSpec, array: np.ndarray, batched: bool) -> np.ndarray:
    """The array as the component's Triton model takes it ([B] -> [B, 1] where reshaped)."""
    return array.reshape(-1, 1) if batched and len(t.dims) == 1 else array


def from_triton(t: TensorSpec, array: np.ndarray, batched: bool) -> np.ndarray:
    """The array back in the spec's shape ([B, 1] -> [B] where reshaped)."""
    return array.reshape(-1) if batched and len(t.dims) == 1 else array
