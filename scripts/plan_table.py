"""The memory planner's verdicts for models x GPU profiles, as the Markdown tables of
docs/bench-engines.md (one process, so each component is traced once per shape).

    PYTHONPATH=. python scripts/plan_table.py [--models koala-700m,koala-1b,sdxl-base] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.planner import plan_memory  # noqa: E402
from engines.profile import builtin_names, load_profile  # noqa: E402
from exporter.sources import resolve  # noqa: E402

GIB = 1 << 30
PAPER_FIRST = ["rtx3060ti", "rtx2080ti", "rtx4090"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="koala-700m,koala-1b,sdxl-base")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    models = args.models.split(",")
    profiles = PAPER_FIRST + [p for p in builtin_names() if p not in PAPER_FIRST]
    t0 = time.perf_counter()
    plans = {(m, p): plan_memory(resolve(f"random:{m}"), load_profile(p)) for m in models for p in profiles}
    seconds = time.perf_counter() - t0
    print("| profile | usable GiB | largest shapes | " + " | ".join(f"{m}: resident / one at a time GiB, verdict (margin GiB)" for m in models) + " |")
    print("|---|---|---|" + "---|" * len(models))
    for p in profiles:
        prof = load_profile(p)
        s = prof.shapes
        cells = []
        for m in models:
            plan = plans[m, p]
            v = plan.verdict()
            cells.append(f"{plan.resident_peak / GIB:.2f} / {plan.sequential_peak / GIB:.2f}, "
                         f"**{'fits' if v['fits'] else 'does not fit'}** ({v['margin_gib']:+.2f})")
        print(f"| {p} | {prof.gpu.usable_bytes / GIB:.2f} | {s.batch[2]} image(s), {s.height[2]}x{s.width[2]} | " + " | ".join(cells) + " |")
    print()
    print("| model | profile | component | precision | parameters | weights GiB | activations GiB | I/O MiB | activation peak at |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in models:
        for p in ("rtx3060ti", "a100-80gb"):
            for c, v in plans[m, p].components.items():
                print(f"| {m} | {p} | {c} | {v.precision} | {v.parameters / 1e6:,.1f}M | {v.weights_bytes / GIB:.3f} | "
                      f"{v.activations_bytes / GIB:.3f} | {v.io_bytes / 2**20:.1f} | `{v.peak_op}` |")
    print(f"\n{len(plans)} plans in {seconds:.1f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({f"{m}@{p}": plan.to_json() for (m, p), plan in plans.items()}, indent=1))


if __name__ == "__main__":
    main()
