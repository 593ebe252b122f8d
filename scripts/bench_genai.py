"""koala-trt's openvino backend beside Intel's own C++ pipeline (openvino-genai's Text2ImagePipeline)
on the same weights and the same image: docs/bench.md, "Beside openvino-genai".

    make genai-venv                                   # .venv-genai: openvino-genai + optimum-intel (pinned)
    python scripts/bench_genai.py --model random:koala-700m --rounds 2      # full size: under flock
    python scripts/bench_genai.py --model random:tiny --size 256 --steps 4  # a quick try

The model is saved once as a diffusers folder; `optimum-cli export openvino --weight-format fp32`
(optimum-intel, in .venv-genai) and `koala-trt export` both read that folder, so both pipelines run
the same weights. Then, alternating round by round, each runs the same request (prompt, size, steps,
guidance; each its own noise) in a fresh process: openvino-genai's load and generate times, and
`koala-trt generate -b openvino --json`'s load, pipeline and wall times. One table; the load average
and CPU beside it. Each full-size process takes the machine-wide lock given by --lock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENAI_VENV = Path(os.environ.get("KOALA_GENAI_VENV", REPO / ".venv-genai"))
PROMPT = "a koala climbing a eucalyptus tree at sunset, photo"

GENAI_RUN = r"""
import json, sys, time
t0 = time.perf_counter()
import openvino_genai as g
folder, size, steps, guidance, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
config = {"INFERENCE_NUM_THREADS": int(threads)} if threads != "0" else {}
pipe = g.Text2ImagePipeline(folder, "CPU", **config)
t1 = time.perf_counter()
image = pipe.generate(sys.argv[6], width=size, height=size, num_inference_steps=steps, guidance_scale=guidance,
                      generator=g.TorchGenerator(1))
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "pipeline_s": t2 - t1, "shape": list(image.shape), "openvino_genai": g.__version__}))
"""


def run(cmd: list[str], lock: str | None, **kw: object) -> subprocess.CompletedProcess:
    if lock:
        cmd = ["flock", lock, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} vCPUs"
    return platform.processor()


def prepare(a: argparse.Namespace) -> tuple[Path, Path]:
    folder, ov, art = a.out / "diffusers", a.out / "optimum-openvino", a.out / "artifacts"
    if not (folder / "model_index.json").exists():
        sys.path.insert(0, str(REPO))
        from exporter.sources import resolve

        resolve(a.model).pipeline().save_pretrained(str(folder))
    if not (ov / "model_index.json").exists():
        r = run([str(GENAI_VENV / "bin" / "optimum-cli"), "export", "openvino", "--model", str(folder), "--task", "text-to-image",
                 "--weight-format", "fp32", str(ov)], a.lock)
        if r.returncode:
            raise SystemExit(f"optimum-cli export openvino failed: {r.stderr.strip().splitlines()[-1:]}")
    if not (art / "manifest.json").exists():
        r = run([sys.executable, "-m", "koala_trt.cli", "export", "--model", str(folder), "--out", str(art)], a.lock, cwd=REPO)
        if r.returncode:
            raise SystemExit(f"koala-trt export failed: {r.stderr.strip().splitlines()[-1:]}")
    return ov, art


def genai(a: argparse.Namespace, ov: Path) -> dict[str, float]:
    r = run([str(GENAI_VENV / "bin" / "python"), "-c", GENAI_RUN, str(ov), str(a.size), str(a.steps), str(a.guidance),
             str(a.threads or 0), PROMPT], a.lock)
    if r.returncode:
        raise SystemExit(f"openvino-genai failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def koala(a: argparse.Namespace, art: Path, cache_interval: int = 1) -> dict[str, float]:
    cmd = [sys.executable, "-m", "koala_trt.cli", "generate", "-a", str(art), "-b", "openvino", "--cpu-precision", a.cpu_precision,
           "-p", PROMPT, "--steps", str(a.steps), "--guidance", str(a.guidance), "--height", str(a.size), "--width", str(a.size),
           "--seed", "1", "--no-progress", "--json", "-o", str(a.out / "koala.png"), *(["--threads", str(a.threads)] if a.threads else []),
           *(["--cache-interval", str(cache_interval)] if cache_interval > 1 else [])]
    t0 = time.perf_counter()
    r = run(cmd, a.lock, cwd=REPO)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"koala-trt generate failed: {r.stderr.strip().splitlines()[-1:]}")
    t = json.loads(r.stdout)["timings"]
    return {"load_s": (t["load_ms"] + t["verify_ms"]) / 1e3, "pipeline_s": t["total_ms"] / 1e3, "process_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:koala-700m")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-genai")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="both pipelines' threads [default: theirs]")
    ap.add_argument("--cpu-precision", default="auto", help="koala-trt's --cpu-precision (openvino-genai runs its default)")
    ap.add_argument("--cache-interval", default="1",
                    help="koala-trt's feature caching: an interval, or a list (1,3) run one after another in each round "
                         "(> 1 needs artifacts exported with --cache-branch)")
    ap.add_argument("--lock", default=None, help="flock this file around each heavy process (e.g. /work/heavy.lock)")
    a = ap.parse_args()
    if not (GENAI_VENV / "bin" / "optimum-cli").exists():
        print(f"{GENAI_VENV} has no optimum-cli: run `make genai-venv` (or set KOALA_GENAI_VENV)", file=sys.stderr)
        return 2
    try:
        intervals = [int(x) for x in str(a.cache_interval).split(",")]
        if min(intervals) < 1:
            raise ValueError
    except ValueError:
        print(f"--cache-interval takes whole numbers >= 1, comma-separated (got {a.cache_interval!r})", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    ov, art = prepare(a)
    entries = [("openvino-genai", lambda: genai(a, ov))]
    entries += [(f"koala-trt openvino{f' cache {n}' if n > 1 else ''}", lambda n=n: koala(a, art, n)) for n in intervals]  # type: ignore[misc]
    rows = []
    for i in range(a.rounds):  # alternating, each in a fresh process
        for name, fn in entries:
            before = load()
            r = fn()
            rows.append({"round": i + 1, "pipeline": name, **r, "load_avg_before": before})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{a.model}, {a.size}x{a.size}, {a.steps} steps, guidance {a.guidance}; {cpu()}")
    print("| round | pipeline | load s | pipeline s | load avg before |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['pipeline']} | {r['load_s']:.1f} | {r['pipeline_s']:.1f} | {r['load_avg_before']} |")
    (a.out / "results.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
