"""Weight-only INT8, `koala-trt quantize --precision int8-wo`: the INT8 mode NVIDIA documents for
TensorRT-RTX on Ampere and newer GPUs.

Per component (the U-Net and both text encoders):
1. FP16 with FP32 islands, exactly as `koala-trt convert` makes it (calibration/fp16.py, ModelOpt
   AutoCast; the U-Net's ranges from the calibration set when --calib is given, else from spec
   dummy inputs);
2. every MatMul/Gemm whose weight is an initializer, outside the exclusion list (NVIDIA's SDXL list,
   calibration/int8.py DEFAULT_EXCLUDE, matched on the module path), gets INT8 weights: symmetric,
   per output channel (scale = amax / 127 per column of a MatMul's [K, N] weight, per row of a
   transB Gemm's [N, K] one), stored as an int8 initializer behind a DequantizeLinear whose scale
   has the weight's float type (FP16, or FP32 in an FP32 island). Activations are not quantized:
   no QuantizeLinear, no calibration of activation ranges.
DequantizeLinear with an FP16 scale needs opset 19; the export's opset 18 graph is marked opset 19
(every op of the graphs here has the same semantics in 18 and 19: 19 only widens types and adds
attributes whose defaults keep the opset-18 behaviour).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from calibration.artifacts import Check, check_io_types, copy_artifacts, finish, load_fp32_source, save_onnx
from calibration.int8 import DEFAULT_EXCLUDE, module_path
from exporter.manifest import Manifest
from koala_core.atomic import staged_dir
from koala_core.errors import KoalaError, UsageError
from koala_core.meter import Meter, process_peak_rss_mb

Log = Callable[[str], None]

PRECISION = "int8-wo"
WO_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")
WO_OPS = ("MatMul", "Gemm")
OPSET = 19  # DequantizeLinear with a float16 scale


@dataclass
class WeightOnlyOptions:
    components: list[str] = field(default_factory=lambda: list(WO_COMPONENTS))
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE  # regexes searched in each node's module path
    calib: Path | None = None  # for the U-Net's FP16 ranges (as `convert --calib`)
    force: bool = False


def _weight_axis(node: Any, w: np.ndarray) -> int | None:
    """The output-channel axis of a 2-D GEMM weight, or None when the node is not a plain GEMM."""
    if w.ndim != 2:
        return None
    if node.op_type == "MatMul":
        return 1  # x [.., K] @ W [K, N]
    attrs = {a.name: a for a in node.attribute}
    if "transA" in attrs and attrs["transA"].i:
        return None
    return 0 if ("transB" in attrs and attrs["transB"].i) else 1


def module_paths(path: Path) -> dict[str, str]:
    """node name -> PyTorch module path, from the exported graph (AutoCast drops the metadata that
    records the module but keeps the node names)."""
    import onnx

    return {n.name: module_path(n) for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type in WO_OPS}


def quantize_weights(model: Any, exclude: tuple[str, ...], modules: dict[str, str] | None = None) -> dict[str, Any]:
    """Replace the weights of the model's MatMul/Gemm nodes by int8 + DequantizeLinear, in place.
    `modules`: node name -> module path (module_paths of the FP32 graph) for the exclusion list."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    patterns = [re.compile(p) for p in exclude]
    done: dict[str, str] = {}  # weight -> dequantized name (a weight shared by several GEMMs once)
    quantized, excluded, skipped = [], [], []
    new_nodes: dict[str, Any] = {}  # node name -> the DequantizeLinear to insert before it
    for node in model.graph.node:
        if node.op_type not in WO_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        mod = (modules or {}).get(node.name) or module_path(node)
        hit = next((p.pattern for p in patterns if p.search(mod) or p.search(node.name)), None)
        if hit:
            excluded.append({"node": node.name, "module": mod, "reason": f"matches {hit!r}"})
            continue
        name = node.input[1]
        t = inits[name]
        if t.data_type not in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT):
            skipped.append(node.name)
            continue
        if name not in done:
            w = numpy_helper.to_array(t)
            axis = _weight_axis(node, w)
            if axis is None or users.get(name, 0) != sum(1 for n in model.graph.node if n.op_type in WO_OPS and n.input[1:2] == [name]):
                skipped.append(node.name)
                continue
            w32 = w.astype(np.float32)
            amax = np.abs(w32).max(axis=1 - axis)
            scale = np.maximum(amax / 127.0, 1e-8 if t.data_type == onnx.TensorProto.FLOAT16 else 1e-12).astype(w.dtype)
            shape = (1, -1) if axis == 1 else (-1, 1)
            q = np.clip(np.rint(w32 / scale.astype(np.float32).reshape(shape)), -127, 127).astype(np.int8)
            qname, sname, zname, dqname = name + "_int8", name + "_scale", name + "_zero_point", name + "_dq"
            t.CopyFrom(numpy_helper.from_array(q, qname))
            model.graph.initializer.extend([numpy_helper.from_array(scale, sname),
                                            numpy_helper.from_array(np.zeros(scale.shape, np.int8), zname)])
            new_nodes[node.name] = helper.make_node("DequantizeLinear", [qname, sname, zname], [dqname],
                                                    name=f"{node.name}_weight_dq", axis=axis)
            done[name] = dqname
        node.input[1] = done[name]
        quantized.append({"node": node.name, "module": mod})
    if new_nodes:  # each DequantizeLinear right before its GEMM: the graph stays topologically sorted
        nodes = list(model.graph.node)
        del model.graph.node[:]
        for n in nodes:
            if n.name in new_nodes:
                model.graph.node.append(new_nodes[n.name])
            model.graph.node.append(n)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < OPSET:
            o.version = OPSET
    return {"quantized": quantized, "excluded": excluded, "left_float": skipped}


def quantize_weight_only(onnx_dir: Path, out: Path, opts: WeightOnlyOptions, log: Log = print, check: Check | None = None,
                         on_report: Callable[[dict[str, Any]], None] | None = None, gate: bool = True) -> tuple[Manifest, dict[str, Any]]:
    """A complete weight-only INT8 artifacts folder at `out`; returns the manifest and, per component,
    its layer report (quantized / excluded)."""
    try:
        import modelopt.onnx.autocast  # noqa: F401
    except ImportError as e:
        raise UsageError(f"--precision {PRECISION} needs NVIDIA ModelOpt's ONNX tools ({e}); install them with: pip install 'koala-trt[precision]'") from None
    import onnx

    from calibration.fp16 import Fp16Options, convert_component

    src = load_fp32_source(onnx_dir)
    names = [n for n in opts.components if n in src.components]
    if not names:
        raise UsageError(f"{onnx_dir} holds none of the components to quantize ({', '.join(opts.components)})")
    if opts.calib is not None and "unet" in names:  # refused before any graph is converted
        from calibration.dataset import check_same_unet, load_calibration

        calib = load_calibration(opts.calib)
        check_same_unet(calib, src)
        calib.verify()
        calib.load_shard(calib.view.shards[0], src.spec("unet"))
    started = time.perf_counter()
    layers: dict[str, Any] = {}
    with staged_dir(out, force=opts.force) as stage:
        manifest = copy_artifacts(src, stage)
        for i, name in enumerate(names, 1):
            log(f"[{i}/{len(names)}] {name}: FP16 activations (ModelOpt AutoCast), INT8 per-channel GEMM weights")
            dst = stage / src.record(name).file
            fp16 = convert_component(src, name, dst, Fp16Options(calib=opts.calib), log, scratch=stage.parent)
            with Meter() as m:
                model = onnx.load(str(dst))
                report = quantize_weights(model, opts.exclude if name == "unet" else (), module_paths(src.onnx_path(name)))
                if not report["quantized"]:
                    raise KoalaError(f"{name}: no MatMul/Gemm weight was quantized: the result would be an FP16 graph")
                del model.graph.value_info[:]
                save_onnx(model, dst)
                del model
                onnx.shape_inference.infer_shapes_path(str(dst), str(dst), check_type=True, strict_mode=False, data_prop=True)
            onnx.checker.check_model(str(dst))
            c = manifest.component(name)
            c["precision"] = PRECISION
            c["conversion"] = {
                "tool": "modelopt.onnx.autocast + koala-trt weight-only INT8", "weights": "int8 symmetric, per-channel "
                "(output-channel axis), MatMul/Gemm only", "activations": "fp16 (FP32 islands as `convert` keeps them)",
                "quantized_layers": len(report["quantized"]), "excluded_layers": len(report["excluded"]),
                "left_float": len(report["left_float"]), "exclude_patterns": list(opts.exclude) if name == "unet" else [],
                "fp16": fp16, "seconds": round(fp16["seconds"] + m.seconds, 2),
                "peak_rss_mb": round(max(fp16["peak_rss_mb"], m.peak_rss_mb), 1)}
            check_io_types(manifest, name)
            layers[name] = report
            log(f"      {len(report['quantized'])} GEMMs with INT8 weights, {len(report['excluded'])} excluded; "
                f"{fp16['fp32_nodes']} nodes kept FP32; {c['conversion']['seconds']:.1f} s")
        finish(manifest, {"precision": PRECISION, "from": str(Path(onnx_dir).resolve()), "converted": names,
                          "calibration": str(Path(opts.calib).resolve()) if opts.calib else None,
                          "seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(process_peak_rss_mb(), 1)},
               (lambda m: {**check(m), "layers": layers}) if check else None, on_report, gate)
    manifest.root = Path(out)
    return manifest, layers
