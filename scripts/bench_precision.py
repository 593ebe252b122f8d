"""U-Net step latency of precision variants in ONNX Runtime on this CPU, side by side in one run.

    python scripts/bench_precision.py --fp32 ART32 --variant int8=ART8 [--variant int8-ort=ART8O] \
        [--height 1024 --width 1024 --batch 2 --rounds 3 --threads N] [--json OUT.json]

Every session is created first; then one warm-up run each, then `rounds` rounds in which each
variant runs once on the same inputs (interleaved, so machine load affects all alike). Reports the
median step time, the speedup against FP32 and each variant's output against FP32 ONNX Runtime
(relative L2) on that very input. The CPU memory arena is off so one session's activations are
released before the next runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.manifest import load_manifest  # noqa: E402
from exporter.metrics import error_stats  # noqa: E402
from koala_core.machine import cpu_model, load_average  # noqa: E402
from koala_core.meter import Meter, process_peak_rss_mb  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", required=True, type=Path)
    ap.add_argument("--variant", action="append", default=[], help="NAME=ARTIFACTS_DIR")
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import onnxruntime as ort

    folders = {"fp32": args.fp32, **{v.split("=", 1)[0]: Path(v.split("=", 1)[1]) for v in args.variant}}
    manifests = {k: load_manifest(p) for k, p in folders.items()}
    spec = manifests["fp32"].spec("unet")
    feeds = spec.dummy_inputs(args.batch, args.height, args.width, seed=11)
    sessions, load = {}, {}
    for name, m in manifests.items():
        opts = ort.SessionOptions()
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 3
        if args.threads:
            opts.intra_op_num_threads = args.threads
        with Meter() as mt:
            sessions[name] = ort.InferenceSession(str(m.onnx_path("unet")), opts, providers=["CPUExecutionProvider"])
        load[name] = round(mt.seconds, 1)
        print(f"loaded {name} ({m.precision('unet')}) in {mt.seconds:.1f} s", file=sys.stderr)
    outs, times = {}, {n: [] for n in sessions}
    for name, s in sessions.items():  # warm-up (and the output compared)
        t = time.perf_counter()
        outs[name] = s.run(None, feeds)[0]
        print(f"warm-up {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    for r in range(args.rounds):
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - t)
            print(f"round {r + 1} {name}: {times[name][-1]:.2f} s", file=sys.stderr)
    base = statistics.median(times["fp32"])
    result = {"machine": {"cpu": cpu_model(), "onnxruntime": ort.__version__, "python": platform.python_version(),
                          "threads": args.threads or "default",
                          "load_average": load_average()},
              "shape": {"batch": args.batch, "height": args.height, "width": args.width}, "rounds": args.rounds,
              "peak_rss_mb": round(process_peak_rss_mb(), 1), "variants": {}}
    print(f"{'variant':<12} {'precision':<9} {'median s':>9} {'min s':>7} {'speedup':>8} {'rel L2 vs fp32':>15}")
    for name in sessions:
        med = statistics.median(times[name])
        rel = error_stats(outs["fp32"], outs[name].astype(np.float32)).rel_l2
        result["variants"][name] = {"folder": str(folders[name]), "precision": manifests[name].precision("unet"),
                                    "target": manifests[name].component("unet").get("conversion", {}).get("target"),
                                    "seconds": [round(t, 3) for t in times[name]], "median_s": round(med, 3),
                                    "speedup": round(base / med, 3), "rel_l2_vs_fp32_ort": rel, "load_s": load[name]}
        print(f"{name:<12} {manifests[name].precision('unet'):<9} {med:>9.2f} {min(times[name]):>7.2f} {base / med:>7.2f}x {rel:>15.3e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
