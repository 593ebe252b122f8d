"""Error statistics between a reference and a candidate tensor (numpy only; used by the export
check, the precision reports and `validate`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ErrorStats:
    max_abs: float
    mean_abs: float
    rel_l2: float  # ||candidate - reference|| / ||reference||
    cosine: float
    nonfinite: int  # NaN/Inf count in the candidate
    ref_max_abs: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def error_stats(reference: np.ndarray, candidate: np.ndarray) -> ErrorStats:
    if reference.shape != candidate.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape}, candidate {candidate.shape}")
    ref = reference.astype(np.float64).ravel()
    cand = candidate.astype(np.float64).ravel()
    nonfinite = int(cand.size - np.count_nonzero(np.isfinite(cand)))
    if nonfinite:
        inf = float("inf")
        return ErrorStats(inf, inf, inf, float("nan"), nonfinite, float(np.abs(ref).max(initial=0.0)))
    diff = np.abs(cand - ref)
    ref_norm, cand_norm = float(np.linalg.norm(ref)), float(np.linalg.norm(cand))
    rel = float(np.linalg.norm(cand - ref) / ref_norm) if ref_norm > 0 else float(np.linalg.norm(cand))
    cos = float(np.dot(ref, cand) / (ref_norm * cand_norm)) if ref_norm > 0 and cand_norm > 0 else float(ref_norm == cand_norm)
    return ErrorStats(float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0, rel, cos, 0,
                      float(np.abs(ref).max(initial=0.0)))


@dataclass(frozen=True)
class Tolerance:
    """An output passes when rel_l2 <= rel_l2 and max_abs <= max_abs_rel * max(1, max|reference|)."""

    rel_l2: float = 1e-3
    max_abs_rel: float = 1e-2

    def check(self, s: ErrorStats) -> list[str]:
        """The broken limits, as readable phrases (empty when the output passes)."""
        if s.nonfinite:
            return [f"{s.nonfinite} non-finite values"]
        bad = []
        if s.rel_l2 > self.rel_l2:
            bad.append(f"relative L2 {s.rel_l2:.3g} > {self.rel_l2:.3g}")
        limit = self.max_abs_rel * max(1.0, s.ref_max_abs)
        if s.max_abs > limit:
            bad.append(f"max abs error {s.max_abs:.3g} > {limit:.3g}")
        return bad
