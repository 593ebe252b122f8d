"""Benchmark the sampler's own (non-model) work per denoising step over ONNX Runtime.

Runs the numpy sampler on an artifacts folder `--runs` times after one warm-up run and reports, per
denoising step, the loop's wall time minus the time inside backend.run("unet") (scaling the input,
the CFG concat and combination, the Euler update, the progress bar), next to the U-Net step itself.

  PYTHONPATH=. python scripts/bench_sampler.py --artifacts /tmp/tiny --height 256 --width 256 --steps 25 --runs 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.manifest import load_manifest  # noqa: E402
from koala_core.machine import cores, cpu_model, load_average  # noqa: E402
from koala_core.meter import process_peak_rss_mb  # noqa: E402
from runtime.backend import OnnxRuntimeBackend  # noqa: E402
from sampler.loop import PipelineAssets, Request, Sampler  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", required=True, type=Path)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up run")
    ap.add_argument("--no-warmup", action="store_true", help="time the first run too (cold numpy/tokenizer caches)")
    ap.add_argument("--no-decode", action="store_true", help="stop at the final latents (skip the VAE decode)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--isolated", action="store_true",
                    help="after one real U-Net call, answer every U-Net call with that cached output: times the "
                         "sampler's numpy work alone, free of ONNX Runtime's threads and of other processes' load")
    ap.add_argument("--no-spin", action="store_true",
                    help="ONNX Runtime sessions with session.intra_op.allow_spinning=0 (an experiment; not the shipped default)")
    args = ap.parse_args()

    import numpy as np
    import onnxruntime

    if args.no_spin:
        base = onnxruntime.SessionOptions

        class NoSpin(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                super().__init__()
                self.add_session_config_entry("session.intra_op.allow_spinning", "0")

        onnxruntime.SessionOptions = NoSpin  # koala_core.ort.make_session builds its options from this

    m = load_manifest(args.artifacts)
    backend = OnnxRuntimeBackend(m, threads=args.threads)
    sampler = Sampler(CachedUNet(backend) if args.isolated else backend, PipelineAssets.from_manifest(m))
    t0 = time.perf_counter()
    sampler.backend.load(["text_encoder", "text_encoder_2", "unet"] + ([] if args.no_decode else ["vae_decoder"]))
    load_s = time.perf_counter() - t0
    plan = sampler.plan(Request("a koala climbing a eucalyptus tree at sunset, photo", steps=args.steps, guidance=args.guidance,
                                seed=0, height=args.height, width=args.width, batch=args.batch))
    runs = []
    for r in range(args.runs + (0 if args.no_warmup else 1)):
        _, t = sampler.sample(plan, progress=False, decode=not args.no_decode)
        if r or args.no_warmup:
            runs.append(t)
    over = [o for t in runs for o in t.step_overheads()]
    unet = [u for t in runs for u in t.stages["unet"]]
    sample_over = [1e3 * (t.total("sample") - t.model_seconds()) for t in runs]
    result = {
        "artifacts": str(args.artifacts), "model": m.data["source"]["model"], "size": f"{plan.width}x{plan.height}",
        "batch": plan.batch, "cfg": plan.cfg, "isolated": args.isolated, "ort_spinning": not args.no_spin, "steps": plan.steps, "runs": len(runs), "decode": not args.no_decode,
        "steps_measured": len(over), "load_s": round(load_s, 2),
        "overhead_per_step_ms": {"mean": statistics.mean(over) * 1e3, "median": statistics.median(over) * 1e3,
                                 "max": max(over) * 1e3},
        "unet_step_ms": {"mean": statistics.mean(unet) * 1e3, "min": min(unet) * 1e3},
        "overhead_pct_of_unet_step": 100 * statistics.mean(over) / statistics.mean(unet),
        "non_model_overhead_per_run_ms": {"mean": statistics.mean(sample_over), "max": max(sample_over)},
        "tokenize_ms": statistics.mean(1e3 * t.total("tokenize") for t in runs),
        "peak_rss_gib": round(process_peak_rss_mb() / 1024, 2),
        "machine": {"cpu": cpu_model(), "cores": cores(), "python": platform.python_version(),
                    "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
                    "providers": sorted({p for s in backend._sessions.values() for p in s.get_providers()}),
                    "load_average": load_average()},
    }
    print(json.dumps(result, indent=2))


class CachedUNet:
    """The real backend, except that the U-Net runs once and its output is then returned as is."""

    def __init__(self, backend: OnnxRuntimeBackend) -> None:
        self.inner, self.name, self.specs = backend, backend.name, backend.specs
        self.cached: dict | None = None

    def load(self, components: list[str]) -> None:
        self.inner.load(components)

    def shape_range(self, component: str):  # noqa: ANN201
        return self.inner.shape_range(component)

    def run(self, component: str, feeds: dict) -> dict:
        if component != "unet":
            return self.inner.run(component, feeds)
        if self.cached is None:
            self.cached = self.inner.run(component, feeds)
        return self.cached

    def close(self) -> None:
        self.inner.close()


if __name__ == "__main__":
    main()
