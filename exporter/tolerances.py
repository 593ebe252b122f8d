"""The accuracy limits of koala-trt: one table, per precision and per metric, with the measured
per-component exceptions, used by every gate that compares a graph with the FP32 PyTorch
reference:
- the export check (`exporter.check`, FP32 ONNX Runtime vs PyTorch: `tolerance(component, "fp32")`);
- `koala-trt validate` (every metric, with `-t component.metric=value` overrides), and through it
  the accuracy report of `convert` / `quantize` (accuracy.json, FP16 / INT8,
  validation/heldout.py).
It lives in exporter/ (the lowest layer that compares outputs) so that exporter/, calibration/
and engines/ all read the same limits.

Metrics (every one computed against the FP32 PyTorch reference):
- rel_l2      ||cand - ref||_2 / ||ref||_2, worst over the samples            (pass: <= limit)
- max_abs     max |cand - ref|, worst over the samples; its limit is the factor here
              times max(1, max|ref|), so it is absolute for outputs within +-1  (pass: <= limit)
- cosine      <cand, ref> / (||cand|| ||ref||), worst over the samples        (pass: >= limit)
- nonfinite   NaN/Inf count in the candidate; always 0                          (pass: == 0)
- latent_rel_l2  rel_l2 of the final latents after the last denoising step    (end to end)
- psnr        10 log10(1 / MSE) of the decoded images in [0, 1], in dB        (end to end, pass: >=)
- ssim        Wang et al. 2004 structural similarity of the images            (end to end, pass: >=)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from exporter.metrics import Tolerance
from exporter.specs import COMPONENTS
from koala_core.errors import UsageError

PRECISIONS = ("fp32", "fp16", "int8", "int8-wo", "fp8")  # what an artifacts folder's components may record
END_TO_END = "end_to_end"


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    doc: str


COMPONENT_METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("rel_l2", False, "relative L2 error"),
    Metric("max_abs", False, "max abs error (limit x max(1, |ref|))"),
    Metric("cosine", True, "cosine similarity"),
    Metric("nonfinite", False, "NaN/Inf values"),
)}
END_TO_END_METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("latent_rel_l2", False, "final latents, relative L2"),
    Metric("psnr", True, "image PSNR (dB)"),
    Metric("ssim", True, "image SSIM"),
    Metric("nonfinite", False, "NaN/Inf values in latents and images"),
)}

# The table: precision -> metric -> limit.
# - rel_l2 / max_abs, fp32: FP32 ONNX Runtime against FP32 PyTorch differs by kernel order only
#   (measured: rel L2 <= 5.1e-6 and max abs <= 1.3e-5 for every random:koala-700m component, about
#   1e-6 for random:tiny). 20x above that, and tight enough that an FP16 graph (unit roundoff
#   4.9e-4) fails it, which `koala-trt validate` needs of its FP32 gate.
# - rel_l2 / max_abs, fp16 / int8: the gates of `convert` / `quantize`. FP16 rounds at about 1e-3
#   per op; INT8 per-tensor activations are coarser (the CPU target is relative L2 <= 0.07 on the
#   full U-Net).
# - cosine is implied by relative L2 (cos >= sqrt(1 - rel_l2^2) for a same-norm candidate, so
#   1 - cos ~ rel_l2^2 / 2), so its limit sits just below what the rel_l2 limit allows: a direction
#   check that also holds for a rescaled output.
# - End-to-end limits grow with the lossiness of the precision, since differences compound over the
#   denoising steps. Measured on KOALA-700M at 512 px after 4 steps (docs/bench-precision.md): final
#   latents FP16 1.6e-3, INT8 0.13-0.16 (cosine 0.988-0.992). The FP16/INT8 PSNR and SSIM limits are
#   not calibrated on real weights (none here).
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"rel_l2": 1e-4, "max_abs": 1e-3, "cosine": 0.99999, "nonfinite": 0.0,
             "latent_rel_l2": 1e-3, "psnr": 45.0, "ssim": 0.995},
    "fp16": {"rel_l2": 2e-2, "max_abs": 1e-1, "cosine": 0.999, "nonfinite": 0.0,
             "latent_rel_l2": 2e-2, "psnr": 35.0, "ssim": 0.98},
    # bf16 is a run-time precision, not an artifact's: `validate --backend openvino` with
    # --cpu-precision bf16 (or auto on a BF16 CPU) runs the FP32 graphs with BF16 matmuls and
    # convolutions (8-bit mantissa, unit roundoff 3.9e-3), the sinusoids' phases kept FP32
    # (runtime/openvino_backend.py). Measured against FP32 PyTorch with `koala-trt validate --backend
    # openvino --cpu-precision bf16` on random:tiny (AMD EPYC, AVX512-BF16, 4 Dec 2026;
    # docs/openvino.md): rel L2 4.9e-3..1.3e-2 (the U-Net the worst), max abs <= 0.039, cosine >=
    # 0.99991; end to end latents 1.3e-2, PSNR 51.3 dB, SSIM 0.9997. The full-size KOALA-700M U-Net
    # step: 0.010 (BENCHMARKS.md). The limits are about 4x these (rel L2, max abs, latents), 12x
    # (1 - cosine), 16 dB under the PSNR: the same BF16 rounding on AMX and AVX512-BF16 hardware;
    # AVX2-only CPUs never run bf16 (resolve_cpu_precision refuses it). A phase rounded to BF16 gave
    # 0.054 (U-Net, t = 999), over the limit; a wrong weight or op gives ~1.
    "bf16": {"rel_l2": 0.05, "max_abs": 0.15, "cosine": 0.999, "nonfinite": 0.0,
             "latent_rel_l2": 0.05, "psnr": 35.0, "ssim": 0.98},
    "int8": {"rel_l2": 0.15, "max_abs": 1.0, "cosine": 0.985, "nonfinite": 0.0,
             "latent_rel_l2": 0.3, "psnr": 20.0, "ssim": 0.8},
    # int8-wo (weight-only INT8: per-channel INT8 GEMM weights, FP16 activations, `quantize
    # --precision int8-wo`) and fp8 (E4M3 weights and activations, `quantize --precision fp8`).
    # Measured with the accuracy report of `quantize` on random:tiny (1 held-out prompt, 2 steps,
    # 128 px; AMD EPYC Zen 4, AVX-512 VNNI): int8-wo rel L2 5.3e-3 (U-Net), 1.1e-2 / 1.5e-2 (text
    # encoders), max abs <= 0.031, end-to-end latents 8.6e-3, PSNR 55.9 dB, SSIM 0.9999; fp8 U-Net
    # rel L2 0.097, max abs 0.20, cosine 0.9953, latents 0.119, PSNR 32.3 dB, SSIM 0.981. Full-size
    # KOALA-700M at 1024 px: BENCHMARKS.md ("FP8 and weight-only INT8 U-Nets"). The limits are about
    # 3x (int8-wo) and 2.5x (fp8) the worst figure: ONNX Runtime has no integer or FP8 kernels for
    # these graphs (DequantizeLinear, then a float GEMM/Conv), so the error is the rounding fixed in
    # the graph, the same on AVX2 and AVX-512/AMX CPUs up to float summation order; a wrong scale or
    # weight gives rel L2 near 1. PSNR/SSIM limits sit below the measured values, not calibrated at
    # full size.
    "int8-wo": {"rel_l2": 0.05, "max_abs": 0.2, "cosine": 0.998, "nonfinite": 0.0,
                "latent_rel_l2": 0.1, "psnr": 30.0, "ssim": 0.95},
    "fp8": {"rel_l2": 0.25, "max_abs": 1.0, "cosine": 0.97, "nonfinite": 0.0,
            "latent_rel_l2": 0.4, "psnr": 18.0, "ssim": 0.7},
}

# Per-component exceptions to the table, each from a measurement. The FP32 VAE decoder's mid-block
# self-attention reduces over every latent position (16,384 at 1024 px), where ONNX Runtime and
# PyTorch differ by rel L2 1.5e-4 to 1.7e-4 on random:koala-700m (docs/bench-validate.md; 5e-6 at
# 256 px): it keeps the former 1e-3.
COMPONENT_TOLERANCES: dict[tuple[str, str], dict[str, float]] = {
    ("vae_decoder", "fp32"): {"rel_l2": 1e-3, "max_abs": 1e-3},
}


def tolerance(component: str, precision: str) -> Tolerance:
    """The rel_l2 / max_abs gate of one component at `precision`, as `exporter.metrics.Tolerance`
    (the export check's form)."""
    limits = {**TOLERANCES[precision], **COMPONENT_TOLERANCES.get((component, precision), {})}
    return Tolerance(rel_l2=limits["rel_l2"], max_abs_rel=limits["max_abs"])


# bf16 (unit roundoff 3.9e-3) is lossier than fp16 (4.9e-4), int8 lossier still.
# int8-wo (INT8 weights, FP16 activations) sits between FP16 and the quantized activations of fp8
# and int8.
LOSSINESS = {p: i for i, p in enumerate(("fp32", "fp16", "bf16", "int8-wo", "fp8", "int8"))}


def end_to_end_precision(precisions: Iterable[str]) -> str:
    """The end-to-end gate follows the lossiest component (int8 > bf16 > fp16 > fp32)."""
    return max(precisions, key=lambda p: LOSSINESS.get(p, 0), default="fp32")


def check_precision(precision: str, where: str) -> str:
    if precision not in TOLERANCES:
        raise UsageError(f"{where} records precision {precision!r}; validate knows {', '.join(PRECISIONS)}")
    return precision


def passes(metric: str, value: float | None, limit: float) -> bool:
    """NaN, Inf and missing values never pass (except a PSNR of +inf: identical images)."""
    if value is None or math.isnan(value):
        return False
    higher = (COMPONENT_METRICS.get(metric) or END_TO_END_METRICS[metric]).higher_is_better
    if metric == "nonfinite":
        return value == 0
    return value >= limit if higher else (math.isfinite(value) and value <= limit)


@dataclass(frozen=True)
class Override:
    component: str  # a component, "end_to_end", or "*" (every component)
    metric: str
    value: float


def parse_overrides(items: Iterable[str]) -> list[Override]:
    """--tolerance component.metric=value (component `*` = every component); one error per bad item."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        comp, dot, metric = key.strip().partition(".")
        if not sep or not dot or not comp or not metric:
            raise UsageError(f"--tolerance {item!r}: expected component.metric=value, e.g. unet.rel_l2=2e-4")
        known = list(COMPONENTS) + [END_TO_END, "*"]
        if comp not in known:
            raise UsageError(f"--tolerance {item!r}: unknown component {comp!r}; expected one of {', '.join(known)}")
        metrics = END_TO_END_METRICS if comp == END_TO_END else COMPONENT_METRICS
        if metric not in metrics or metric == "nonfinite":
            allowed = [m for m in metrics if m != "nonfinite"]
            why = "NaN/Inf always fails" if metric == "nonfinite" else f"unknown metric {metric!r}"
            raise UsageError(f"--tolerance {item!r}: {why}; {comp} takes {', '.join(allowed)}")
        try:
            value = float(raw)
        except ValueError:
            raise UsageError(f"--tolerance {item!r}: {raw!r} is not a number") from None
        if not math.isfinite(value) or (value < 0 and metric != "psnr"):
            raise UsageError(f"--tolerance {item!r}: the limit must be a finite number >= 0")
        out.append(Override(comp, metric, value))
    return out


def limits_for(component: str, precision: str, overrides: list[Override]) -> dict[str, float]:
    """The limits of one component (or "end_to_end") at `precision`, overrides applied (the
    component's own override wins over `*`)."""
    metrics = END_TO_END_METRICS if component == END_TO_END else COMPONENT_METRICS
    limits = {m: TOLERANCES[precision][m] for m in metrics}
    limits.update(COMPONENT_TOLERANCES.get((component, precision), {}))
    for scope in ("*", component):
        for o in overrides:
            if o.component == scope and o.metric in limits and not (scope == "*" and component == END_TO_END):
                limits[o.metric] = o.value
    return limits
