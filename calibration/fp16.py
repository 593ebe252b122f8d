"""`koala-trt convert --precision fp16`: FP16 graphs with FP32 islands, by NVIDIA ModelOpt AutoCast
(modelopt.onnx.autocast.convert_to_mixed_precision).

AutoCast keeps in FP32 every node whose inputs or outputs exceed `data_max` in magnitude on
calibration data, and every initializer above `init_max`; we also keep normalization ops in FP32
(their reductions are what overflow first).

Memory: AutoCast's own reference runner copies the model, marks every tensor as an output and
keeps all of them for every sample: 20.1 GiB peak on the full KOALA-700M U-Net with a single
256 px sample. So the activation ranges are measured here instead (calibration/ranges.py: every
float tensor's per-sample min/max, reduced at once) and handed to AutoCast as a custom node rule
with the same semantics as its IORangeRule; AutoCast then runs without its reference runner
(data_max=inf). Graph inputs and
outputs keep their FP32 types (keep_io_types), so callers do not change. The VAE decoder stays FP32
unless asked: SDXL's VAE overflows in FP16 (use an fp16-safe VAE such as sdxl-vae-fp16-fix).
"""

from __future__ import annotations

import collections
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from calibration.artifacts import Check, check_io_types, copy_artifacts, finish, load_fp32_source, quiet_library, save_onnx
from calibration.inputs import token_ids, unet_samples
from exporter.manifest import Manifest
from koala_core.atomic import staged_dir
from koala_core.errors import KoalaError, UsageError
from koala_core.meter import Meter, process_peak_rss_mb

Log = Callable[[str], None]

FP16_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "controlnet", "unet_controlnet")  # the ControlNet pair where exported
# Normalizations stay FP32: their mean/variance reductions are where FP16 overflows first.
KEEP_FP32_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "ReduceMean", "Pow", "Sqrt")
GEMM_OPS = ("MatMul", "Gemm")
DATA_MAX = 512.0  # AutoCast's default: activations beyond this magnitude keep their node in FP32
INIT_MAX = 65504.0  # FP16's largest finite value
RANGE_SIDE = 256  # without a calibration set, the U-Net's ranges are taken on spec inputs at this side


@dataclass
class Fp16Options:
    components: list[str] = field(default_factory=lambda: list(FP16_COMPONENTS))
    vae_fp16: bool = False
    vae_gemm_fp16: bool = False  # the VAE decoder with only its GEMMs (attention) in FP16: builds for Turing
    calib: Path | None = None
    samples: int = 4  # calibration samples the FP32 graph runs on for the ranges
    keep_fp32_ops: tuple[str, ...] = KEEP_FP32_OPS
    data_max: float = DATA_MAX
    force: bool = False


def _range_inputs(src: Manifest, name: str, opts: Fp16Options) -> list[dict[str, np.ndarray]]:
    spec = src.spec(name)
    if spec.kind == "text_encoder":
        from calibration.dataset import load_prompts

        return [token_ids(src, name, load_prompts()[:8])]
    if name == "unet" and opts.calib is not None:
        from calibration.dataset import check_same_unet, load_calibration

        calib = load_calibration(opts.calib)
        check_same_unet(calib, src)
        return unet_samples(calib, spec, opts.samples)
    exp = src.record(name).export or {}
    side = lambda v: max(spec.size_multiple, min(v, RANGE_SIDE) // spec.size_multiple * spec.size_multiple)  # noqa: E731
    return [spec.dummy_inputs(2, side(exp["height"]), side(exp["width"]), seed=10 + i) for i in range(min(opts.samples, 2))]


def compute_precisions(model: Any) -> dict[str, str]:
    """node name -> "fp16" or "fp32", for every compute node of a converted graph with a float
    output (casts and shape plumbing left out): the FP32 islands are the "fp32" ones."""
    import onnx

    types: dict[str, int] = {}
    for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        types[v.name] = v.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    out: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in ("Cast", "Constant", "Shape", "Reshape", "Unsqueeze", "Squeeze", "Concat", "Gather", "Slice", "Transpose"):
            continue
        dt = {types.get(o) for o in node.output}
        if onnx.TensorProto.FLOAT16 in dt:
            out[node.name] = "fp16"
        elif onnx.TensorProto.FLOAT in dt:
            out[node.name] = "fp32"
    return out


def _precision_census(model: Any) -> dict[str, Any]:
    """How many compute nodes run in FP16 and which op types stayed FP32 (the FP32 islands)."""
    ops = {n.name: n.op_type for n in model.graph.node}
    precisions = compute_precisions(model)
    fp32 = collections.Counter(ops[n] for n, p in precisions.items() if p == "fp32")
    return {"fp16_nodes": sum(p == "fp16" for p in precisions.values()), "fp32_nodes": sum(fp32.values()),
            "fp32_islands_by_op": dict(fp32.most_common())}


def _check_finite(src: Manifest, name: str, path: Path, samples: list[dict[str, np.ndarray]]) -> None:
    from koala_core.ort import make_session

    spec = src.spec(name)
    session = make_session(path, providers=["CPUExecutionProvider"])
    for feeds in samples:
        for t, out in zip(spec.outputs, session.run(None, {i.name: feeds[i.name] for i in spec.inputs})):
            bad = int(out.size - np.count_nonzero(np.isfinite(out)))
            if bad:
                raise KoalaError(f"{name} in FP16 gives {bad} non-finite values in {t.name}: this VAE overflows in FP16 "
                                 "(keep it FP32, or export an fp16-safe VAE such as sdxl-vae-fp16-fix)")


def _float_tensors(model: Any) -> list[str]:
    """Every float32 tensor a node reads or writes (graph inputs and node outputs; no weights)."""
    import onnx

    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    inits = {t.name for t in model.graph.initializer}
    names: list[str] = []
    seen: set[str] = set()
    for v in model.graph.input:
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and v.name not in inits:
            names.append(v.name)
            seen.add(v.name)
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        for o in node.output:
            if o and o not in seen and types.get(o) == onnx.TensorProto.FLOAT:
                names.append(o)
                seen.add(o)
    return names


def _range_rule(absmax: dict[str, float], data_max: float, init_absmax: dict[str, float] | None = None,
                init_max: float = INIT_MAX) -> Any:
    """An AutoCast node rule: keep a node FP32 when an input or output exceeded `data_max` in
    magnitude on the calibration samples (the semantics of AutoCast's IORangeRule), or when one of
    its float32 initializers holds a value beyond `init_max` (its InitializerRangeRule, on
    magnitudes measured from disk)."""
    from modelopt.onnx.autocast.nodeclassifier import NodeRuleBase

    from calibration.autocast_on_disk import init_max_rule

    beyond_init_max = init_max_rule(init_absmax or {}, init_max)

    class MeasuredRangeRule(NodeRuleBase):
        def _check_inner(self, node: Any) -> bool:
            if node.op_type == "Constant":
                return False
            return any(absmax.get(t, 0.0) > data_max for t in (*node.input, *node.output) if t) or beyond_init_max(node)

    return MeasuredRangeRule()


def _halves(samples: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Each batch element of each sample on its own (the U-Net's CFG batch: negative, then positive).
    Every op of these graphs works on each batch element independently, so the min and max over the
    runs are those over the batched samples, at half the activations' memory (1024 px U-Net)."""
    for feeds in samples:
        sizes = {v.shape[0] if v.ndim else 0 for v in feeds.values()}
        if len(sizes) != 1 or (b := sizes.pop()) < 2:
            yield feeds
            continue
        for i in range(b):
            yield {k: v[i:i + 1] for k, v in feeds.items()}


def measure_ranges(path: Path, samples: list[dict[str, np.ndarray]], split_batch: bool = False,
                   scratch: Path | None = None) -> dict[str, float]:
    """name -> largest magnitude over the samples of every float tensor of the graph at `path`
    (the range pass of calibration/ranges.py, in-graph reductions, graph run in node order)."""
    import onnx

    from calibration.ranges import collect_ranges

    names = _float_tensors(onnx.load(str(path), load_external_data=False))
    with tempfile.TemporaryDirectory(prefix="koala-fp16-", dir=scratch) as tmp:
        feeds = _halves(samples) if split_batch else iter(samples)
        ranges = collect_ranges(path, names, feeds, scratch=Path(tmp)).reduce("max")
    return {n: ranges.amax(n) for n in names}


def autocast(path: Path, absmax: dict[str, float], keep_ops: list[str], data_max: float) -> Any:
    """ModelOpt AutoCast on the graph at `path` with the measured ranges, its weights left on disk
    (calibration/autocast_on_disk.py): the FP16 graph, whose external initializers still refer to
    the source's data file, to be written by `save_with_weights`."""
    from modelopt.onnx.autocast import convert_to_mixed_precision
    import onnx

    from calibration.autocast_on_disk import initializer_absmax, weights_on_disk

    path = Path(path).resolve()
    init_absmax = initializer_absmax(onnx.load(str(path), load_external_data=False), path.parent)
    with weights_on_disk(path.parent):
        return convert_to_mixed_precision(
            str(path), low_precision_type="fp16", keep_io_types=True, data_max=np.inf,
            custom_rule=_range_rule(absmax, data_max, init_absmax, INIT_MAX),
            op_types_to_exclude=keep_ops, init_max=None, providers=["cpu"])


def convert_component(src: Manifest, name: str, out_path: Path, opts: Fp16Options, log: Log, scratch: Path | None = None) -> dict[str, Any]:
    """AutoCast one component's graph to FP16; returns what the manifest records about it."""
    try:
        import modelopt.onnx.autocast  # noqa: F401
    except ImportError as e:
        raise UsageError(f"FP16 conversion needs NVIDIA ModelOpt's ONNX tools ({e}); install them with: pip install 'koala-trt[precision]'") from None
    import onnx

    from calibration.autocast_on_disk import save_with_weights, with_external_weights

    samples = _range_inputs(src, name, opts)
    path = src.onnx_path(name)
    gemm_only = name == "vae_decoder" and opts.vae_gemm_fp16
    keep_ops = list(opts.keep_fp32_ops)
    if gemm_only:  # every op type but the GEMMs stays FP32 (TensorRT-RTX has no FP32 GEMM on Turing)
        keep_ops = sorted({n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node} - set(GEMM_OPS))
    with Meter() as mr:
        absmax = measure_ranges(path, samples, split_batch=src.spec(name).kind == "unet", scratch=scratch)
    out_of_range = sum(v > opts.data_max for v in absmax.values())
    with Meter() as m, quiet_library(), tempfile.TemporaryDirectory(prefix="koala-fp16-", dir=scratch) as tmp:
        source = with_external_weights(path, Path(tmp))
        model = autocast(source, absmax, keep_ops, opts.data_max)
        census = _precision_census(model)
        # AutoCast leaves value_info shapes specialised to the calibration inputs; ONNX Runtime then
        # fails at other sizes ("shape mismatch attempting to re-use buffer"). Infer them afresh.
        del model.graph.value_info[:]
        for old in out_path.parent.glob("*"):  # the component's old graph and weights
            if old.is_file():
                old.unlink()
        save_with_weights(model, source.parent, out_path)
        del model
        onnx.shape_inference.infer_shapes_path(str(out_path), str(out_path), check_type=True, strict_mode=False, data_prop=True)
    if census["fp16_nodes"] == 0:
        raise KoalaError(f"{name}: AutoCast left every node in FP32; nothing was converted")
    onnx.checker.check_model(str(out_path))
    if name == "vae_decoder":  # SDXL's VAE overflows in FP16: a non-finite decode fails the conversion
        _check_finite(src, name, out_path, samples)
    shape = {k: list(v.shape) for k, v in samples[0].items()}
    return {"tool": "modelopt.onnx.autocast", "seconds": round(mr.seconds + m.seconds, 2),
            "peak_rss_mb": round(max(mr.peak_rss_mb, m.peak_rss_mb), 1),
            "ranges": {"tensors": len(absmax), "above_data_max": out_of_range, "seconds": round(mr.seconds, 2),
                       "peak_rss_mb": round(mr.peak_rss_mb, 1)},
            "autocast": {"seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak_rss_mb, 1), "weights": "converted on disk"},
            "range_inputs": {"samples": len(samples), "shapes": shape,
                             "from": "calibration set" if name == "unet" and opts.calib else ("prompts" if "text" in name else "spec dummy inputs")},
            "data_max": opts.data_max, "keep_fp32_ops": keep_ops, "fp16_ops": "gemm" if gemm_only else "all", **census}


def convert_fp16(onnx_dir: Path, out: Path, opts: Fp16Options, log: Log = print, check: Check | None = None,
                 on_report: Callable[[dict[str, Any]], None] | None = None, gate: bool = True) -> Manifest:
    """A complete FP16 artifacts folder at `out` from the FP32 folder `onnx_dir`."""
    src = load_fp32_source(onnx_dir)
    names = [n for n in opts.components if n in src.components]
    if opts.vae_fp16 and opts.vae_gemm_fp16:
        raise UsageError("--vae-fp16 and --vae-gemm-fp16 exclude each other: choose the whole VAE decoder in FP16 "
                         "(fp16-safe VAEs only) or its GEMMs only")
    vae = opts.vae_fp16 or opts.vae_gemm_fp16
    if vae and "vae_decoder" in src.components and "vae_decoder" not in names:
        names.append("vae_decoder")
    if not vae and "vae_decoder" in names:
        raise UsageError("the SDXL VAE decoder overflows in FP16: it stays FP32 unless you pass --vae-fp16 (with an "
                         "fp16-safe VAE) or --vae-gemm-fp16 (its GEMMs only)")
    if not names:
        raise UsageError(f"{onnx_dir} holds none of the components to convert ({', '.join(opts.components)})")
    if opts.calib is None:
        log("note: no --calib given: the U-Net's FP16 ranges come from spec dummy inputs; a calibration set "
            "(`koala-trt calibrate`) gives ranges from real denoising trajectories")
    if opts.calib is not None and "unet" in names:  # refused before any graph is converted
        from calibration.dataset import check_same_unet, load_calibration

        check_same_unet(load_calibration(opts.calib), src)
    started = time.perf_counter()
    with staged_dir(out, force=opts.force) as stage:
        manifest = copy_artifacts(src, stage, skip=names)  # the converted graphs are written afresh
        for i, name in enumerate(names, 1):
            log(f"[{i}/{len(names)}] {name}: FP16 with FP32 islands (ModelOpt AutoCast)")
            info = convert_component(src, name, stage / src.record(name).file, opts, log, scratch=stage.parent)
            c = manifest.component(name)
            c["precision"] = "fp16"
            c["conversion"] = info
            check_io_types(manifest, name)
            islands = ", ".join(f"{k} {v}" for k, v in list(info["fp32_islands_by_op"].items())[:6])
            log(f"      {info['fp16_nodes']} nodes FP16, {info['fp32_nodes']} FP32 ({islands}); "
                f"{info['seconds']:.1f} s, peak RSS {info['peak_rss_mb'] / 1024:.2f} GiB")
        finish(manifest, {"precision": "fp16", "from": str(Path(onnx_dir).resolve()), "converted": names,
                          "seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(process_peak_rss_mb(), 1)},
               check, on_report, gate)
    manifest.root = Path(out)
    return manifest
