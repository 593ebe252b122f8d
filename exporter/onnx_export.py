"""torch -> ONNX for one component, with torch's dynamo exporter (torch.export + onnxscript).

Why dynamo: on the full KOALA-700M U-Net it writes a ~1,900-node graph with one external data file
in less time and memory than the legacy TorchScript exporter (~4,500 nodes, hundreds of weight files).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exporter.specs import ComponentSpec, ShapeRange
from exporter.wrappers import wrap

TWO_GB = 2 * 1024**3


@dataclass
class ExportStats:
    nodes_before: int
    nodes_after: int
    external_data: bool
    bytes: int


def _dynamic_shapes(spec: ComponentSpec, r: ShapeRange) -> dict[str, dict[int, Any]]:
    """torch.export Dims per input axis, from the spec's symbols and the claimed shape range.

    Spatial dims are multiples of the spec's granularity (the U-Net needs latents divisible by its
    downsampling factor), which torch.export must be told, or it specializes or rejects them; the
    `sequence` axis likewise is a whole number of prompt chunks (fixed where the range is one count)."""
    from torch.export import Dim

    f, m = spec.latent_factor, spec.size_multiple
    made: dict[str, Any] = {}
    bases: dict[str, Any] = {}

    def dim(sym: str) -> Any:
        if sym in made:
            return made[sym]
        name, _, k = sym.partition("/")
        if k:  # a ControlNet residual at 1/k of the latents: the same base Dim, k times coarser
            dim(name)
            step = m // f // int(k)
            d = step * bases[name] if step > 1 else bases[name]
        elif sym == "batch":
            d = Dim("batch", min=r.batch[0], max=r.batch[2])
        elif sym == "sequence":
            lo, _, hi = r.prompt_chunks or (1, 1, 1)
            d = None if lo == hi else int(spec.sizes(1, 8, 8, 1)["sequence"]) * Dim("prompt_chunks", min=lo, max=hi)
        else:
            lo, hi = (r.height[0], r.height[2]) if "height" in sym else (r.width[0], r.width[2])
            unit = f if sym.startswith("latent") else 1  # pixels per unit of this axis
            step = m // unit  # granularity in this axis's units
            key = "height" if "height" in sym else "width"  # pixels and latents (a ControlNet takes both) share one Dim
            if key not in bases:
                bases[key] = Dim(sym, min=max(1, -(-lo // m)), max=hi // m)
            base = bases[sym] = bases[key]
            d = step * base if step > 1 else base
        made[sym] = d
        return d

    return {t.name: {i: v for i, d in enumerate(t.dims) if isinstance(d, str) and (v := dim(d)) is not None}
            for t in spec.inputs}


def trace_chunks(r: ShapeRange) -> int:
    """Prompt chunks of the traced dummy input: 2 where the range allows (torch.export specializes a
    dim traced at 1), else the range's only count."""
    lo, _, hi = r.prompt_chunks or (1, 1, 1)
    return lo if lo == hi else max(lo, min(2, hi))


def _name_dims(model: Any, spec: ComponentSpec, r: ShapeRange) -> None:
    """Give graph inputs and outputs the spec's symbolic dim names (torch writes s0, 4*s1, ...); a
    sequence range of one chunk count was traced fixed, so its length is written, not a symbol."""
    import onnx_ir as ir

    lo, _, hi = r.prompt_chunks or (1, 1, 1)
    fixed = {"sequence": spec.sizes(1, 8, 8, lo)["sequence"]} if lo == hi else {}
    for values, tensors in ((model.graph.inputs, spec.inputs), (model.graph.outputs, spec.outputs)):
        for v, t in zip(values, tensors):
            v.shape = ir.Shape([d if isinstance(d, int) else fixed.get(d) or ir.SymbolicDim(d) for d in t.dims])


def export_onnx(spec: ComponentSpec, module: torch.nn.Module, path: Path, batch: int, height: int, width: int,
                shape_range: ShapeRange, opset: int, static: bool = False) -> ExportStats:
    """Export `module` (wrapped to the spec's signature) to `path`, dynamic over `shape_range`
    (or with every shape fixed at batch x height x width when `static`)."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
    wrapper = wrap(spec, module)
    dummy = spec.dummy_inputs(batch, height, width, seed=1, chunks=trace_chunks(shape_range))
    args = tuple(torch.from_numpy(dummy[t.name]) for t in spec.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, args, dynamo=True, optimize=False, verbose=False,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes=None if static else _dynamic_shapes(spec, shape_range), opset_version=opset, report=False,
        )
    before = _count_nodes(program.model.graph)
    program.optimize()  # onnxscript: constant folding, dead code and redundant op removal
    after = _count_nodes(program.model.graph)
    if not static:
        _name_dims(program.model, spec, shape_range)
    size = sum(int(v.const_value.nbytes) for v in program.model.graph.initializers.values() if v.const_value is not None)
    external = size >= TWO_GB - (64 << 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=external)
    del program
    _infer_shapes(path)
    return ExportStats(before, after, external, sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file()))


def _count_nodes(graph: Any) -> int:
    return len(graph)  # top-level nodes, as `len(model.graph.node)` counts them


def _infer_shapes(path: Path) -> None:
    """ONNX shape inference in place (path-based, so it works past 2 GB with external data)."""
    import onnx

    onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=False, data_prop=True)
