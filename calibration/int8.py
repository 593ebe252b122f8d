"""`koala-trt quantize`: an INT8 U-Net with explicit QuantizeLinear/DequantizeLinear.

Two phases, so the full U-Net fits in this machine's memory:
1. ranges (calibration/ranges.py): the FP32 U-Net runs on the recorded trajectories and keeps only
   the running min/max of the tensors to be quantized (cached in the calibration folder, so a
   second quantization of the same graph, e.g. for the other target, skips this phase);
2. Q/DQ insertion from those cached ranges, in the layout of the deployment target:
   - tensorrt (default): NVIDIA ModelOpt's ONNX quantizer (modelopt.onnx.quantization), INT8
     symmetric (int8 zero points of 0), per-channel weight scales on the output-channel axis,
     per-tensor activations, TensorRT-guided placement. ModelOpt calibrates inside its call; here it
     runs on one sample at the smallest latent size only (cheap), and its activation scales are then
     replaced by the cached ones (ModelOpt's calibration-cache import).
   - onnxruntime: onnxruntime.quantization.quantize_static in QDQ format from the same cached
     ranges, with uint8 activations (the U8S8 kernels ONNX Runtime's x86 CPU code fuses) and
     symmetric per-channel int8 weights in 7 bits (-64..64, ONNX Runtime's reduce_range) unless
     `full_range_weights`: CPUs without VNNI or AMX (AVX2 only) multiply u8 x s8 pairs with
     vpmaddubsw, whose int16 pair sums saturate beyond 7-bit weights (ONNX Runtime and OpenVINO
     alike), so 8-bit weights made the U-Net's error 3.5x there (random:tiny: 0.119 against 0.034 in
     exact arithmetic; 7 bits: 0.037 both ways).
The sensitive layers stay in float, as NVIDIA's SDXL recipe keeps them (time and add embeddings,
conv_in, conv_out, conv_shortcut, norm_out, proj_out), and so do attention's activation-by-
activation MatMuls; both are configurable.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from calibration.artifacts import Check, check_io_types, copy_artifacts, finish, load_fp32_source, quiet_library, save_onnx
from calibration.dataset import CalibrationSet, check_same_unet, load_calibration
from calibration.inputs import unet_samples
from calibration.ranges import QUANT_OPS, Ranges, SampleRanges, activation_inputs, collect_ranges
from exporter.manifest import Manifest, sha256_file
from koala_core.jsonfile import write_json
from koala_core.atomic import staged_dir
from koala_core.errors import KoalaError, UsageError
from koala_core.meter import Meter, process_peak_rss_mb

Log = Callable[[str], None]

TARGETS = ("tensorrt", "onnxruntime")
QDQ_PRECISIONS = ("int8", "fp8")  # weights and activations quantized (fp8: calibration/fp8.py)
# NVIDIA's SDXL INT8 recipe (TensorRT diffusion demo / ModelOpt) keeps these modules in float.
DEFAULT_EXCLUDE = ("time_emb_proj", "time_embedding", "conv_in", "conv_out", "conv_shortcut", "add_embedding", "norm_out", "proj_out")


@dataclass
class Int8Options:
    precision: str = "int8"  # or "fp8" (E4M3, TensorRT layout only)
    target: str = "tensorrt"
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE  # regexes searched in each node's module path
    quantize_attention: bool = False  # also Q/DQ the activation x activation MatMuls of attention
    full_range_weights: bool = False  # onnxruntime target: 8-bit weights (exact only on VNNI/AMX CPUs), not 7
    max_samples: int = 64  # calibration samples for the ranges, spread over prompts and steps
    method: str = "mean"  # how per-sample ranges are reduced: "max" or "mean" (calibration/ranges.py)
    threads: int | None = None
    force: bool = False


def module_path(node: Any) -> str:
    """The PyTorch module a node came from (torch.onnx's name scopes), else the node's name."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in json.loads(p.value.replace("'", '"')) if s]
            except json.JSONDecodeError:
                break
            if len(scopes) >= 2:
                return scopes[-2]  # the innermost module; the last scope is the op itself
    return node.name


@dataclass
class Plan:
    candidates: list[str]  # nodes that may get Q/DQ (weighted Conv/MatMul/Gemm, not excluded)
    excluded: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> {module, reason}
    modules: dict[str, str] = field(default_factory=dict)  # node -> module path
    attention: set[str] = field(default_factory=set)  # activation x activation MatMuls


def plan_nodes(model: Any, opts: Int8Options) -> Plan:
    consts = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    patterns = [re.compile(p) for p in opts.exclude]
    plan = Plan([])
    for node in model.graph.node:
        if node.op_type not in QUANT_OPS:
            continue
        mod = module_path(node)
        plan.modules[node.name] = mod
        weighted = len(node.input) > 1 and node.input[1] in consts
        if not weighted:
            plan.attention.add(node.name)
        hit = next((p.pattern for p in patterns if p.search(mod) or p.search(node.name)), None)
        if hit:
            plan.excluded[node.name] = {"module": mod, "reason": f"matches {hit!r}"}
        elif not weighted and not opts.quantize_attention:
            plan.excluded[node.name] = {"module": mod, "reason": "attention (activation x activation)"}
        else:
            plan.candidates.append(node.name)
    return plan


def _ranges(unet: Path, model: Any, plan: Plan, calib: CalibrationSet, spec: Any, opts: Int8Options, log: Log,
            scratch: Path) -> tuple[Ranges, dict[str, Any]]:
    """Phase 1, cached in the calibration folder under a key of the graph, tensors and samples."""
    from tqdm import tqdm

    from koala_core.run_settings import progress_disabled

    chosen = {n.name: n for n in model.graph.node if n.name in set(plan.candidates)}
    names = activation_inputs(model, QUANT_OPS)
    names = [t for t in names if any(t in chosen[n].input for n in chosen)]
    # ONNX Runtime's QDQ layout also quantizes the outputs of the layers it quantizes.
    names += [o for n in chosen.values() for o in n.output if o not in set(names)]
    key = hashlib.sha256(json.dumps([sha256_file(unet), names, opts.max_samples,
                                     [s.sha256 for s in calib.view.shards]]).encode()).hexdigest()[:16]
    cache = calib.root / f"ranges-{key}.json"
    if cache.is_file():
        try:
            per_sample = SampleRanges.from_json(json.loads(cache.read_text()))
            log(f"      activation ranges: reusing {cache.name} ({len(names)} tensors, {per_sample.samples} samples)")
            return per_sample.reduce(opts.method), {"cached": True, "file": cache.name, "seconds": 0.0, "peak_rss_mb": 0.0}
        except (json.JSONDecodeError, KeyError, ValueError, TypeError):
            log(f"      {cache.name} is unreadable: computing the ranges again")
    samples = unet_samples(calib, spec, opts.max_samples)
    log(f"      activation ranges: {len(names)} tensors over {len(samples)} calibration samples "
        f"(batch {samples[0]['sample'].shape[0]}, latents {samples[0]['sample'].shape[2]}x{samples[0]['sample'].shape[3]})")
    bar = tqdm(total=len(samples), unit="sample", desc="ranges", file=sys.stderr, disable=progress_disabled(), mininterval=1.0)
    try:
        with Meter() as m:
            per_sample = collect_ranges(unet, names, iter(samples), threads=opts.threads, progress=bar.update, scratch=scratch)
    finally:
        bar.close()
    write_json(cache, per_sample.to_json())
    return per_sample.reduce(opts.method), {"cached": False, "file": cache.name, "seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak_rss_mb, 1)}


def _scratch_copy(src: Path, tmp: Path) -> Path:
    """The graph and its weight files copied into a scratch folder: the quantizers write beside
    their input, and onnx/ONNX Runtime refuse symlinked and hard-linked external data."""
    for f in src.parent.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    return tmp / src.name


def _tensorrt(src_path: Path, plan: Plan, ranges: Ranges, dry_run: dict[str, np.ndarray], tmp: Path, big: bool) -> Any:
    """ModelOpt's quantizer. It runs its own calibration (and its GEMV detection) on `dry_run`, one
    real calibration sample; the activation scales are then replaced by the cached ranges."""
    try:
        from modelopt.onnx.quantization import quantize as mo_quantize
    except ImportError as e:
        raise UsageError(f"--target tensorrt needs NVIDIA ModelOpt's ONNX tools ({e}); install them with: pip install 'koala-trt[precision]'") from None
    import onnx

    cache = tmp / "calibration.cache"
    ranges.write_trt_cache(cache)
    out = tmp / "out" / "model.onnx"
    out.parent.mkdir()
    mo_quantize(str(_scratch_copy(src_path, tmp)), quantize_mode="int8", calibration_data=dry_run, calibration_method="max",
                calibration_cache_path=str(cache), calibration_eps=["cpu"], op_types_to_quantize=list(QUANT_OPS),
                nodes_to_exclude=[f"^{re.escape(n)}$" for n in plan.excluded],  # ModelOpt reads regexes
                disable_mha_qdq=not _any_attention(plan),
                high_precision_dtype="fp32", dq_only=True, use_external_data_format=big, output_path=str(out), log_level="WARNING")
    return onnx.load(str(out))


def _small_dry_run(src: Manifest, spec: Any) -> dict[str, np.ndarray]:
    """FP8: ModelOpt's own one-sample calibration, whose every activation scale is replaced by the
    cached ranges, runs on spec inputs at the export's smallest size (CFG batch 2): it keeps every
    quantized tensor of the sample, which at 1024 px would take gigabytes for nothing."""
    rng = src.shape_range("unet")
    return spec.dummy_inputs(2, rng.height[0], rng.width[0], seed=0)


def _any_attention(plan: Plan) -> bool:
    """True when attention's activation x activation MatMuls are to be quantized (--quantize-attention)."""
    return not any(v["reason"].startswith("attention") for v in plan.excluded.values())


def _onnxruntime(src_path: Path, plan: Plan, ranges: Ranges, tmp: Path, big: bool, reduce_range: bool) -> Any:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    cache = tmp / "ranges.json"
    save_tensors_data(ranges.to_ort(), cache)
    out = tmp / "out" / "model.onnx"
    out.parent.mkdir()
    quantize_static(str(_scratch_copy(src_path, tmp)), str(out), calibration_data_reader=None, calibration_cache_path=str(cache),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANT_OPS), per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                    nodes_to_quantize=plan.candidates, nodes_to_exclude=list(plan.excluded), use_external_data_format=big,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    return onnx.load(str(out))


def qdq_census(model: Any, plan: Plan) -> dict[str, Any]:
    """Which layers the quantizer really quantized (weight input, or both inputs of an activation x
    activation MatMul, fed by DequantizeLinear), and the Q/DQ counts."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    chosen = set(plan.candidates)
    quantized = [n.name for n in model.graph.node if n.name in chosen and len(n.input) > 1 and n.input[1] in dq_out
                 and (n.input[0] in dq_out or n.op_type != "MatMul" or n.name not in plan.attention)]
    q = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    dq = sum(n.op_type == "DequantizeLinear" for n in model.graph.node)
    done = set(quantized)
    return {"quantize_linear": q, "dequantize_linear": dq, "quantized": quantized,
            "left_float_by_quantizer": [n for n in plan.candidates if n not in done]}


def check_layout(precision: str, target: str, full_range_weights: bool) -> None:
    """The Q/DQ layout options that go together, checked before any model work."""
    if precision == "fp8" and target != "tensorrt":
        raise UsageError("--precision fp8 has the TensorRT layout only (ONNX Runtime has no FP8 kernels on CPU): drop --target onnxruntime")
    if full_range_weights and target != "onnxruntime":
        raise UsageError("--full-range-weights is for --target onnxruntime (the TensorRT layout's weights are 8-bit already)")


def quantize_int8(onnx_dir: Path, calib_dir: Path, out: Path, opts: Int8Options, log: Log = print, check: Check | None = None,
                  on_report: Callable[[dict[str, Any]], None] | None = None, gate: bool = True) -> tuple[Manifest, dict[str, Any]]:
    """A complete INT8 artifacts folder at `out` (U-Net with Q/DQ; every other component as in
    `onnx_dir`); returns the manifest and the layer report (quantized / excluded)."""
    import onnx

    if opts.precision not in QDQ_PRECISIONS:
        raise UsageError(f"unknown --precision {opts.precision!r}; expected one of {', '.join(QDQ_PRECISIONS)}")
    if opts.target not in TARGETS:
        raise UsageError(f"unknown --target {opts.target!r}; expected one of {', '.join(TARGETS)}")
    check_layout(opts.precision, opts.target, opts.full_range_weights)
    if opts.method not in ("max", "mean"):
        raise UsageError(f"unknown --calib-method {opts.method!r}; expected max or mean")
    if opts.max_samples < 1:
        raise UsageError("--samples must be at least 1")
    src = load_fp32_source(onnx_dir)
    if "unet" not in src.components:
        raise UsageError(f"{onnx_dir} has no unet to quantize")
    calib = load_calibration(calib_dir)
    check_same_unet(calib, src)
    spec = src.spec("unet")
    calib.verify()  # fail early and clearly on a missing or corrupt shard
    calib.load_shard(calib.view.shards[0], spec)  # ... or on one that does not fit this U-Net
    unet = src.onnx_path("unet")
    big = any(p.name != unet.name for p in unet.parent.iterdir() if p.is_file())
    reduce_range = opts.target == "onnxruntime" and not opts.full_range_weights  # 7-bit weights
    structure = onnx.load(str(unet), load_external_data=False)
    plan = plan_nodes(structure, opts)
    if not plan.candidates:
        raise UsageError("every Conv/MatMul/Gemm of the U-Net is excluded; nothing to quantize")
    started = time.perf_counter()
    with staged_dir(out, force=opts.force) as stage:
        manifest = copy_artifacts(src, stage)
        log(f"[1/2] unet: activation ranges from {calib_dir}")
        scratch = stage / ".scratch"  # beside the output, removed before the folder is hashed
        scratch.mkdir()
        ranges, range_info = _ranges(unet, structure, plan, calib, spec, opts, log, scratch)
        del structure
        log(f"[2/2] unet: inserting {opts.precision.upper()} Q/DQ for {opts.target} ({len(plan.candidates)} candidate layers, {len(plan.excluded)} excluded)")
        with tempfile.TemporaryDirectory(prefix="koala-int8-", dir=scratch) as tmp, Meter() as m, quiet_library():
            if opts.precision == "fp8":
                from calibration.fp8 import fp8_qdq

                (Path(tmp) / "out").mkdir()
                model = fp8_qdq(_scratch_copy(unet, Path(tmp)), list(plan.excluded), _any_attention(plan), ranges,
                                _small_dry_run(src, spec), Path(tmp) / "out" / "model.onnx", big)
            elif opts.target == "tensorrt":
                model = _tensorrt(unet, plan, ranges, next(calib.samples(spec, limit=1)), Path(tmp), big)
            else:
                model = _onnxruntime(unet, plan, ranges, Path(tmp), big, reduce_range)
            census = qdq_census(model, plan)
            save_onnx(model, stage / src.record("unet").file)
            del model
        shutil.rmtree(scratch)
        if not census["quantized"]:
            raise KoalaError("the quantizer inserted no Q/DQ in front of any layer: the result would be an FP32 graph")
        onnx.checker.check_model(str(stage / src.record("unet").file))
        c = manifest.component("unet")
        fp8 = opts.precision == "fp8"
        c["precision"] = opts.precision
        c["conversion"] = {
            "tool": "modelopt.onnx.quantization" + (" (fp8)" if fp8 else "") if opts.target == "tensorrt" else "onnxruntime.quantization.quantize_static",
            "target": opts.target, "calibration": {"folder": str(Path(calib_dir).resolve()), "method": opts.method,
                                                   "samples": ranges.samples, "tensors": len(ranges.lowest), **range_info},
            "weights": ("float8 e4m3, per-channel (output-channel axis), scale amax / 448" if fp8
                        else "int8 symmetric in 7 bits (-64..64, no u8s8 saturation without VNNI), per-channel (output-channel axis)"
                        if reduce_range else "int8 symmetric, per-channel (output-channel axis)"),
            **({"reduce_range": reduce_range} if opts.target == "onnxruntime" else {}),
            "activations": ("float8 e4m3, per-tensor, scale amax / 448 of the cached ranges" if fp8
                            else "int8 symmetric, per-tensor" if opts.target == "tensorrt" else "uint8 asymmetric, per-tensor"),
            **({"onnxruntime_cpu": "graph optimization level BASIC (EXTENDED's fusions reject float8)"} if fp8 else {}),
            "quantize_linear": census["quantize_linear"], "dequantize_linear": census["dequantize_linear"],
            "quantized_layers": len(census["quantized"]), "excluded_layers": len(plan.excluded),
            "exclude_patterns": list(opts.exclude), "quantize_attention": opts.quantize_attention,
            "seconds": round(m.seconds, 2), "peak_rss_mb": round(m.peak_rss_mb, 1),
        }
        check_io_types(manifest, "unet")
        log(f"      {len(census['quantized'])} layers quantized ({census['quantize_linear']} Q / {census['dequantize_linear']} DQ), "
            f"{len(plan.excluded)} excluded; {m.seconds:.1f} s, peak RSS {m.peak_rss_mb / 1024:.2f} GiB")
        layers = {"quantized": [{"node": n, "module": plan.modules.get(n, n)} for n in census["quantized"]],
                  "excluded": [{"node": n, **v} for n, v in plan.excluded.items()],
                  "left_float_by_quantizer": [{"node": n, "module": plan.modules.get(n, n)} for n in census["left_float_by_quantizer"]]}
        finish(manifest, {"precision": opts.precision, "target": opts.target, "from": str(Path(onnx_dir).resolve()),
                          "calibration": str(Path(calib_dir).resolve()), "converted": ["unet"],
                          "seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(process_peak_rss_mb(), 1)},
               (lambda m: {**check(m), "layers": layers}) if check else None, on_report, gate)
    manifest.root = Path(out)
    return manifest, layers
