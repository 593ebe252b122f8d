"""One component on one input set: Polygraphy's Comparator runs the PyTorch reference and the
candidate runner on the same feeds and checks max abs error (SimpleCompareFunc, "max" statistic)
and cosine similarity (CosineSimilarityCompareFunc); exporter.metrics.error_stats adds what
Polygraphy does not compute: relative L2 and the non-finite count."""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Iterator

import numpy as np

from exporter.metrics import ErrorStats, error_stats
from exporter.tolerances import passes
from koala_core.errors import KoalaError
from validation.results import Check, Measured, finite_or_none


@contextlib.contextmanager
def polygraphy_logging(verbose: bool) -> Iterator[None]:
    """Polygraphy logs to stdout; stdout is for results: silent, or (verbose) on stderr."""
    from polygraphy.logger import G_LOGGER

    if not verbose:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            yield
        return
    with G_LOGGER.verbosity(G_LOGGER.INFO), contextlib.redirect_stdout(sys.stderr):
        yield


def _aggregate(stats: list[ErrorStats]) -> dict[str, Any]:
    """Worst case over the samples (max errors, min cosine, total non-finite count)."""
    return {"rel_l2": max(s.rel_l2 for s in stats), "max_abs": max(s.max_abs for s in stats),
            "mean_abs": float(np.mean([s.mean_abs for s in stats])), "cosine": min(s.cosine for s in stats),
            "nonfinite": sum(s.nonfinite for s in stats), "ref_max_abs": max(s.ref_max_abs for s in stats)}


def compare(check: Check, reference: Any, candidate: Any, feeds: list[dict[str, np.ndarray]], verbose: bool = False) -> Check:
    """Run both Polygraphy runners on `feeds` and measure every output of `check` against its limits."""
    from polygraphy.comparator import Comparator, CosineSimilarityCompareFunc, SimpleCompareFunc
    from polygraphy.exception import PolygraphyException

    limits = check.limits
    check.samples = len(feeds)
    check.shapes = {k: list(v.shape) for k, v in feeds[0].items()}
    bad_shape: dict[str, str] = {}
    try:
        with polygraphy_logging(verbose):
            runs = Comparator.run([reference, candidate], data_loader=feeds)
            ref_iters, cand_iters = runs[reference.name], runs[candidate.name]
            outputs = list(ref_iters[0].keys())
            stats: dict[str, list[ErrorStats]] = {}
            for out in outputs:
                for r, c in zip(ref_iters, cand_iters):
                    if out not in c:
                        bad_shape[out] = f"the candidate has no output {out}"
                        break
                    a, b = np.asarray(r[out]), np.asarray(c[out])
                    if a.shape != b.shape:
                        bad_shape[out] = f"shape {list(b.shape)}, reference {list(a.shape)}"
                        break
                    stats.setdefault(out, []).append(error_stats(a, b.astype(np.float32)))
            ok = [o for o in outputs if o not in bad_shape]
            agg = {o: _aggregate(stats[o]) for o in ok}
            # Polygraphy's "max" check fails only when both the abs and the rel statistic exceed
            # their tolerances; rtol=0 makes it the plain max-abs bound documented in tolerances.py.
            atol = {o: limits["max_abs"] * max(1.0, agg[o]["ref_max_abs"]) for o in ok}
            funcs = [SimpleCompareFunc(check_error_stat="max", atol=atol, rtol=0.0),
                     CosineSimilarityCompareFunc(cosine_similarity_threshold=limits["cosine"])]
            accuracy = Comparator.compare_accuracy(runs, compare_func=funcs) if ok else []
    except PolygraphyException as e:
        raise KoalaError(f"{check.id}: Polygraphy could not compare the outputs ({str(e).strip().splitlines()[0][:200]})") from None
    check.seconds = {reference.name: round(sum(float(it.runtime) for it in ref_iters), 4),
                     candidate.name: round(sum(float(it.runtime) for it in cand_iters), 4)}
    for out, why in bad_shape.items():
        check.measured.append(Measured(out, "shape", None, 0.0, False, why))
    pair = (reference.name, candidate.name)
    per_func = [acc[pair] if pair in acc else [] for acc in accuracy]
    for out in ok:
        a = agg[out]
        check.outputs[out] = {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in a.items()}
        simple = [it[out] for it in per_func[0] if out in it] if per_func else []
        cosine = [it[out] for it in per_func[1] if out in it] if per_func else []
        max_abs = max((r.max_absdiff for r in simple), default=a["max_abs"])
        if a["nonfinite"] or any(r.max_absdiff is None or math.isnan(r.max_absdiff) for r in simple):
            max_abs = float("nan")
        cos_values = [float(r.cosine_similarity) for r in cosine]
        cos = float("nan") if a["nonfinite"] or any(math.isnan(v) for v in cos_values) else min(cos_values, default=a["cosine"])
        check.outputs[out]["polygraphy"] = {"max_absdiff": finite_or_none(max_abs), "cosine_similarity": finite_or_none(cos)}
        check.measured += [
            Measured(out, "rel_l2", a["rel_l2"], limits["rel_l2"], passes("rel_l2", a["rel_l2"], limits["rel_l2"])),
            Measured(out, "max_abs", max_abs, atol[out], bool(simple) and all(bool(r) for r in simple) and math.isfinite(max_abs),
                     f"limit {limits['max_abs']:g} x max(1, max|ref| {a['ref_max_abs']:.3g})"),
            Measured(out, "cosine", cos, limits["cosine"], bool(cosine) and all(bool(r) for r in cosine) and math.isfinite(cos)),
            Measured(out, "nonfinite", float(a["nonfinite"]), 0.0, a["nonfinite"] == 0),
        ]
    return check
