"""The memory planner's verdicts for models x GPU profiles, as the Markdown tables of
docs/bench-engines.md (one process, so each component is traced once per shape).

    PYTHONPATH=. python scripts/plan_table.py [--models koala-700m,koala-1b,sdxl-base] [--json FILE]

With --ladder: the planner's choice (engines/plan_choice.py) for every shipped model preset x card
profile, the verdict table of docs/planner.md:

    PYTHONPATH=. python scripts/plan_table.py --ladder [--profiles rtx3060ti,...] [--min-margin GIB]
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


def ladder(models: list[str], profiles: list[str], min_margin_gib: float = 0.0) -> None:
    """One row per model x card: each rung's margin, and the choice with what it costs."""
    from engines.plan_choice import AID_NAMES, aid_costs, choose
    from exporter.sources import preset_names

    models = models or preset_names()
    t0 = time.perf_counter()
    print("| model | profile | usable GiB | own settings | + tiled VAE decode | + sequential residency | + weight streaming "
          "| choice (margin GiB) | cost |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in models:
        source = resolve(f"random:{m}")
        for p in profiles:
            prof = load_profile(p)
            c = choose(prof, lambda q, s=source: plan_memory(s, q), min_margin_bytes=int(min_margin_gib * GIB))
            cells = []
            for r in c.rungs:
                cell = f"{r.plan.margin_bytes / GIB:+.2f}" if not r.note else f"({r.note})"
                if r.aid == "streaming" and not r.note and r.plan.streamed_per_step_bytes:
                    cell += f", {r.plan.streamed_per_step_bytes / GIB:.2f} GiB/step"
                cells.append(cell)
            if c.chosen is None:
                choice, cost = "**does not fit**", c.summary()
            else:
                what = ", ".join(AID_NAMES[a] for a in c.chosen.aids) or "as it is"
                choice = f"**{what}** ({c.chosen.plan.margin_bytes / GIB:+.2f})"
                cost = "; ".join(aid_costs(c.chosen.plan, c.chosen.aids)) or "none"
            print(f"| {m} | {p} | {prof.gpu.usable_bytes / GIB:.2f} | " + " | ".join(cells) + f" | {choice} | {cost} |")
    print(f"\n{len(models) * len(profiles)} choices in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="koala-700m,koala-1b,sdxl-base")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--ladder", action="store_true", help="the planner's choice for every preset x profile")
    ap.add_argument("--profiles", help="comma-separated profiles [all built-in ones]")
    ap.add_argument("--min-margin", type=float, default=0.0, help="GiB the choice must leave free (--ladder)")
    args = ap.parse_args()
    models = args.models.split(",")
    profiles = PAPER_FIRST + [p for p in builtin_names() if p not in PAPER_FIRST]
    if args.profiles:
        profiles = args.profiles.split(",")
    if args.ladder:
        ladder([] if "--models" not in sys.argv else models, profiles, args.min_margin)
        return
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
