"""FP8 (E4M3) Q/DQ for the U-Net, `koala-trt quantize --precision fp8` (sm_89+ cards).

ModelOpt's ONNX FP8 mode (modelopt.onnx.quantization, quantize_mode="fp8") places the Q/DQ as for
TensorRT (the same candidates and exclusion list as INT8, per-channel weights on the output-channel
axis, per-tensor activations): it quantizes in INT8 through ONNX Runtime's quantizer and then
retypes the Q/DQ to FLOAT8E4M3FN. Two things are then set here:
- the scales. ModelOpt 0.47 converts each INT8 scale s = amax / 127 to s * 448 / 127, which maps
  amax to +-36 instead of E4M3's largest finite value 448 (NVIDIA/Model-Optimizer#215). Here every
  scale is amax / 448, the E4M3 convention of TensorRT and of ModelOpt's PyTorch path: weights per
  output channel from the weights themselves, activations per tensor from the cached calibration
  ranges (calibration/ranges.py, the very ranges INT8 uses; ModelOpt's FP8 mode takes no
  calibration cache, so it calibrates on one sample only and those scales are replaced);
- the weights are stored as FP8 initializers behind a DequantizeLinear (dq_only, as for INT8), so
  the folder holds 1 byte per quantized weight.
Float computation between the Q/DQ stays FP32, as for INT8 (high_precision_dtype="fp32"), so ONNX
Runtime can evaluate the graph on CPU; it does so only at graph optimization level BASIC or below
(koala_core/ort.py), since its EXTENDED fusions reject float8 inputs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from calibration.ranges import QUANT_OPS, Ranges
from koala_core.errors import KoalaError, UsageError

E4M3_MAX = 448.0  # largest finite FLOAT8E4M3FN value
MIN_SCALE = 1e-12  # an all-zero channel or tensor keeps a positive scale


def _axis(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def set_fp8_scales(model: Any, ranges: Ranges) -> dict[str, int]:
    """Set every FP8 QuantizeLinear's scale to amax / 448 (weights per channel, activations from
    `ranges`); returns how many of each were set. An activation without a cached range is an error:
    its scale would come from ModelOpt's one-sample calibration."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done = {"weights": 0, "activations": 0}
    missing = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        zp = inits.get(node.input[2])
        if zp is None or zp.data_type != onnx.TensorProto.FLOAT8E4M3FN:
            continue
        x, s = node.input[0], node.input[1]
        if x in inits:
            w = numpy_helper.to_array(inits[x]).astype(np.float32)
            axis = _axis(node) % w.ndim
            amax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis))
            scale = np.maximum(amax / E4M3_MAX, MIN_SCALE).astype(np.float32)
            done["weights"] += 1
        elif x in ranges.lowest:
            scale = np.float32(max(ranges.amax(x) / E4M3_MAX, MIN_SCALE))
            done["activations"] += 1
        else:
            missing.append(x)
            continue
        old = numpy_helper.to_array(inits[s])
        inits[s].CopyFrom(numpy_helper.from_array(np.asarray(scale, dtype=old.dtype).reshape(old.shape), s))
    if missing:
        raise KoalaError(f"FP8: {len(missing)} quantized activations have no cached calibration range "
                         f"(first: {missing[0]}); the ranges do not match this U-Net")
    return done


def fp8_qdq(src_copy: Path, excluded: list[str], attention: bool, ranges: Ranges, dry_run: dict[str, np.ndarray],
            out: Path, big: bool) -> Any:
    """ModelOpt's FP8 Q/DQ of the graph at `src_copy` (a scratch copy: ModelOpt writes beside it),
    with scales from `ranges` and FP8 weights behind DequantizeLinear."""
    try:
        from modelopt.onnx.quantization import quantize as mo_quantize
        from modelopt.onnx.quantization.qdq_utils import qdq_to_dq
    except ImportError as e:
        raise UsageError(f"--precision fp8 needs NVIDIA ModelOpt's ONNX tools ({e}); install them with: pip install 'koala-trt[precision]'") from None
    import onnx

    mo_quantize(str(src_copy), quantize_mode="fp8", calibration_data=dry_run, calibration_method="max",
                calibration_eps=["cpu"], op_types_to_quantize=list(QUANT_OPS),
                nodes_to_exclude=[f"^{re.escape(n)}$" for n in excluded],  # ModelOpt reads regexes
                disable_mha_qdq=not attention, high_precision_dtype="fp32", dq_only=False,
                use_external_data_format=big, output_path=str(out), log_level="WARNING")
    model = onnx.load(str(out))
    set_fp8_scales(model, ranges)
    model = qdq_to_dq(model)  # weights: FP8 initializers, DequantizeLinear only
    if not any(o.domain in ("", "ai.onnx") and o.version >= 19 for o in model.opset_import):
        raise KoalaError("FP8 Q/DQ needs ONNX opset 19 or newer; ModelOpt left an older opset")
    return model
