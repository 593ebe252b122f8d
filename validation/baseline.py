"""Baselines: `--save-baseline FILE` keeps every metric of a run; `--baseline FILE` compares a new
run with it and fails a metric that got worse beyond the margin, even while its absolute tolerance
still holds (a TensorRT upgrade or a rebuild that shifts accuracy).

Each metric is compared as an error e (0 = perfect):
    rel_l2, max_abs, latent_rel_l2: the value;  cosine, ssim: 1 - value;  psnr: 10^(-psnr/10)
    (the MSE of [0, 1] images).
A metric is worse beyond the margin when
    e_new > e_baseline * (1 + margin) + 0.01 * e_limit
with margin 0.5 by default (--baseline-margin) and e_limit the error its tolerance allows: the
relative part absorbs run-to-run noise in larger errors, the 1 %-of-tolerance floor keeps errors
near zero (identical FP32 kernels) from failing on rounding. Improvements never fail. The non-finite
count is not compared: any NaN/Inf already fails.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from koala_core.errors import UsageError
from validation.results import Check, Measured

FORMAT = "koala-trt-validate-baseline/1"
DEFAULT_MARGIN = 0.5
FLOOR = 0.01  # of the tolerance, in error units
SETTINGS = ("height", "width", "steps", "prompts", "seed", "random_samples", "vae_tile", "scheduler", "image")  # vae_tile, scheduler, image: None in older baselines


def to_error(metric: str, value: float) -> float:
    if metric in ("cosine", "ssim"):
        return 1.0 - value
    if metric == "psnr":
        return 0.0 if value == math.inf else 10.0 ** (-value / 10.0)
    return value


def from_error(metric: str, e: float) -> float:
    if metric in ("cosine", "ssim"):
        return 1.0 - e
    if metric == "psnr":
        return math.inf if e <= 0 else -10.0 * math.log10(e)
    return e


def _key(check: Check, m: Measured) -> str:
    return f"{check.id}/{m.output}/{m.metric}"


def baseline_json(checks: list[Check], settings: dict[str, Any], artifacts: str) -> dict[str, Any]:
    """The metrics of a run (finite values of the comparable metrics only)."""
    metrics = {_key(c, m): m.value for c in checks for m in c.measured
               if m.metric not in ("nonfinite", "shape") and "@" not in m.metric and m.value is not None and not math.isnan(m.value)}
    metrics = {k: (None if v == math.inf else v) for k, v in metrics.items()}  # psnr of identical images
    return {"format": FORMAT, "artifacts": artifacts, "settings": {k: settings[k] for k in SETTINGS}, "metrics": metrics}


def read_baseline(path: Path) -> dict[str, Any]:
    from koala_core.jsonfile import read_json

    data = read_json(Path(path))
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("metrics"), dict):
        raise UsageError(f"--baseline {path}: not a koala-trt validate baseline (expected format {FORMAT}; write one with --save-baseline)")
    return data


def check_settings(baseline: dict[str, Any], settings: dict[str, Any], path: Path) -> None:
    """A baseline only compares with a run on the same inputs."""
    differ = [k for k in SETTINGS if baseline.get("settings", {}).get(k) != settings[k]]
    if differ:
        d = ", ".join(f"{k} {baseline['settings'].get(k)!r} vs {settings[k]!r}" for k in differ)
        raise UsageError(f"--baseline {path} was recorded with other settings ({d}); rerun with the same ones or save a new baseline")


def apply(checks: list[Check], baseline: dict[str, Any], margin: float) -> dict[str, Any]:
    """Add a `<metric>@baseline` measurement beside every metric the baseline holds; returns a summary."""
    old: dict[str, Any] = baseline["metrics"]
    compared, worse, missing = 0, [], []
    seen = set()
    for c in checks:
        for m in list(c.measured):
            key = _key(c, m)
            if key not in old or "@" in m.metric:
                continue
            seen.add(key)
            compared += 1
            base = math.inf if old[key] is None and m.metric == "psnr" else old[key]
            if base is None:
                continue
            e_base = to_error(m.metric, float(base))
            e_allowed = e_base * (1.0 + margin) + FLOOR * to_error(m.metric, m.limit)
            if m.value is None or math.isnan(m.value):
                ok = False
            else:
                ok = to_error(m.metric, m.value) <= e_allowed
            allowed = from_error(m.metric, e_allowed)
            c.measured.append(Measured(m.output, f"{m.metric}@baseline", m.value, allowed, ok,
                                       f"baseline {base:.4g}, margin {margin:g} + {FLOOR:g} x tolerance"))
            if not ok:
                worse.append(key)
    missing = sorted(k for k in old if k not in seen)
    return {"compared": compared, "worse": worse, "not_measured": missing, "margin": margin, "floor_of_tolerance": FLOOR}
