"""The default tolerances of `koala-trt validate`, per precision, and their overrides.

One table. The per-component gates reuse the project's existing ones, so no gate is declared twice:
- fp32: `exporter.check.FP32_TOLERANCE` (the export check's ONNX Runtime vs PyTorch gate);
- fp16, int8: `calibration.accuracy.TOLERANCES` (the gates of `convert` / `quantize`).
Cosine, the end-to-end limits and the measured per-component exceptions (COMPONENT_TOLERANCES)
exist only here.

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

from calibration.accuracy import TOLERANCES as CONVERSION_TOLERANCES
from exporter.check import FP32_COMPONENT_TOLERANCES, FP32_TOLERANCE
from exporter.specs import COMPONENTS
from koala_core.errors import UsageError

PRECISIONS = ("fp32", "fp16", "int8")
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

# Cosine is implied by relative L2 (cos >= sqrt(1 - rel_l2^2) for a same-norm candidate, so
# 1 - cos ~ rel_l2^2 / 2), so its limit sits just below what the rel_l2 limit allows: a direction
# check that also holds for a rescaled output. End-to-end limits grow with the lossiness of the
# precision, since differences compound over the denoising steps. Measured on KOALA-700M at 512 px
# after 4 steps (docs/bench-precision.md): final latents FP16 1.6e-3, INT8 0.13-0.16 (cosine
# 0.988-0.992). The FP16/INT8 PSNR and SSIM limits are not calibrated on real weights (none here).
_EXTRA: dict[str, dict[str, float]] = {
    "fp32": {"cosine": 0.99999, "latent_rel_l2": 1e-3, "psnr": 45.0, "ssim": 0.995},
    "fp16": {"cosine": 0.999, "latent_rel_l2": 2e-2, "psnr": 35.0, "ssim": 0.98},
    "int8": {"cosine": 0.985, "latent_rel_l2": 0.3, "psnr": 20.0, "ssim": 0.8},
}
_BASE = {"fp32": FP32_TOLERANCE, **CONVERSION_TOLERANCES}

# The table: precision -> metric -> limit.
TOLERANCES: dict[str, dict[str, float]] = {
    p: {"rel_l2": _BASE[p].rel_l2, "max_abs": _BASE[p].max_abs_rel, "nonfinite": 0.0, **_EXTRA[p]} for p in PRECISIONS
}

# Per-component exceptions to the table, each from a measurement: the export gate's (see
# exporter.check.FP32_COMPONENT_TOLERANCES for the VAE decoder's reason).
COMPONENT_TOLERANCES: dict[tuple[str, str], dict[str, float]] = {
    (name, "fp32"): {"rel_l2": t.rel_l2, "max_abs": t.max_abs_rel} for name, t in FP32_COMPONENT_TOLERANCES.items()
}

LOSSINESS = {p: i for i, p in enumerate(PRECISIONS)}


def end_to_end_precision(precisions: Iterable[str]) -> str:
    """The end-to-end gate follows the lossiest component (int8 > fp16 > fp32)."""
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
