"""`make bench`: side-by-side performance figures on this machine, in one run (issue 7).

    python scripts/bench.py                       # the full run: random:koala-700m / random:sdxl-base, 1024 px, CFG batch 2
    python scripts/bench.py --quick               # the same sections on random:tiny / random:tiny-sdxl (a few minutes)
    python scripts/bench.py --sections unet,flops --fp32 ART --int8 ART8 --runs 2

Sections (--sections, comma-separated; default all):
  matmul      this machine's fp32 GEMM peak: torch and numpy, `--threads` threads
  unet        one U-Net step at the CFG batch, side by side (`koala-trt bench -b torch,onnxruntime,openvino:fp32,...
              -c unet --no-end-to-end`), each row's error against PyTorch FP32 on the same inputs; ONNX Runtime
              INT8 (Q/DQ) on the --int8 folder
  ratio       KOALA (--model) against SDXL-Base (--big) U-Net step time, both `koala-trt bench --backend torch`
  flops       FLOPs per U-Net step (torch.utils.flop_counter on PyTorch's meta device, the same shapes) and
              each backend's achieved GFLOP/s against the matmul peak
  components  `koala-trt bench -b onnxruntime,torch` per component (text encoders, VAE decode)
  e2e         `koala-trt bench` end to end on onnxruntime (--e2e-steps steps) and images per minute
  export      `koala-trt export` and `koala-trt plan` wall time and peak RSS (process tree polled every 0.1 s)
  optimum     Hugging Face Optimum's exporter on the same model saved as a diffusers folder (its own venv)
  gpu         `koala-trt bench` U-Net step on ONNX Runtime's CUDA provider and on TensorRT (--engines):
              runs only where CUDA is available, otherwise says why it is skipped

Every latency comes from `koala-trt bench --json`, the product's own timing loop (validation/bench.py),
each backend in a process of its own (so its peak memory is its own). This script adds only what
koala-trt bench does not measure (the GEMM peak, FLOP counts, export wall times, Optimum's exporter)
and merges and prints the results. In the full run each heavy process holds `flock` on LOCK
(`$KOALA_HEAVY_LOCK`, default koala-heavy.lock in the temporary folder), so only one heavy job runs
on the machine at a time. Results are merged into OUT/results.json (sections already there are kept
unless re-run) and printed as Markdown tables (OUT/summary.md). The full run (not --quick) also
rewrites the generated part of BENCHMARKS.md (between its `make bench` markers; --benchmarks FILE
names another file, `none` skips it) and draws the U-Net section as OUT/unet.png (`koala-trt bench
--plot`'s chart).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOCK = os.environ.get("KOALA_HEAVY_LOCK", str(Path(tempfile.gettempdir()) / "koala-heavy.lock"))  # one heavy job at a time
SECTIONS = ("matmul", "unet", "ratio", "flops", "components", "e2e", "export", "optimum", "gpu")
OPTIMUM_VENV = Path(os.environ.get("KOALA_OPTIMUM_VENV", REPO / ".venv-optimum"))  # `make optimum-venv`
MODEL_CARD = {"koala-700m_s": 1.257, "sdxl-base_s": 3.133, "steps": 25, "gpu": "RTX 4090"}  # KOALA model card


# ----- workers: what koala-trt bench does not measure; each runs in its own process, returns one dict -----

def worker_matmul(p: dict[str, Any]) -> dict[str, Any]:
    """fp32 GEMM rate (2 n^3 flops per n x n product) in torch and numpy: the machine's practical peak
    (best of `runs` products; latency_stats is koala-trt bench's summary)."""
    import torch

    from validation.bench import latency_stats

    torch.set_num_threads(p["threads"])
    n, out = p["n"], {"n": p["n"], "threads": p["threads"]}
    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy().copy(), b.numpy().copy()
    for name, fn in (("torch", lambda: torch.mm(a, b)), ("numpy", lambda: an @ bn)):
        fn()
        ts = []
        for _ in range(p["runs"]):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        out[name] = {**latency_stats(ts), "gflops": 2 * n**3 / min(ts) / 1e9}
    out["peak_gflops"] = max(out["torch"]["gflops"], out["numpy"]["gflops"])
    out["numpy_blas"] = _numpy_blas()
    return out


def _numpy_blas() -> str:
    import numpy as np

    try:
        cfg = np.show_config(mode="dicts")  # numpy >= 1.25
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except TypeError:
        return "?"


def worker_flops(p: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one U-Net step (torch.utils.flop_counter) and the U-Net's parameter count, on PyTorch's
    meta device: the shapes of the timed step, nothing allocated, nothing timed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from engines.activations import meta_inputs
    from exporter.sources import resolve
    from exporter.specs import specs_from_configs
    from exporter.wrappers import wrap

    src = resolve(p["model"])
    spec = specs_from_configs(src.configs)["unet"]
    module = src.build("unet", device="meta")
    inputs = meta_inputs(spec, p["batch"], p["height"], p["width"], torch.float32)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        wrap(spec, module)(*(inputs[t.name] for t in spec.inputs))
    return {"model": p["model"], "batch": p["batch"], "height": p["height"], "width": p["width"],
            "flops": int(fc.get_total_flops()), "parameters": sum(x.numel() for x in module.parameters())}


def _tree_rss_kb(pid: int) -> int:
    """Resident memory (VmRSS) of `pid` and all its descendants, in KiB (0 once it has exited)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def _time_v(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd`: wall seconds, exit status and peak RSS, polled every 0.1 s over the process tree.

    Not /usr/bin/time's "Maximum resident set size" (ru_maxrss) alone: the kernel computes it from the
    same high-water mark that koala_core/meter.py resets between stages (/proc/self/clear_refs), so for
    koala-trt commands it reports the peak of the last stage only. Both are recorded."""
    with log_path.open("w") as f:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss_kb(proc.pid))
            time.sleep(0.1)
        wall = time.perf_counter() - t
        rc = proc.returncode
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # largest waited-for child so far, KiB
    return {"command": " ".join(cmd), "rc": rc, "wall_s": round(wall, 1), "peak_rss_gib": round(peak / 2**20, 2),
            "children_ru_maxrss_gib": round(maxrss / 2**20, 2), "log": str(log_path)}


def _cli() -> list[str]:
    return [sys.executable, "-m", "koala_trt.cli"]


def worker_export(p: dict[str, Any]) -> dict[str, Any]:
    """koala-trt export (all components, checked) and koala-trt plan per profile/precision, timed."""
    out = Path(p["out"])
    res: dict[str, Any] = {"export": _time_v([*_cli(), "export", "--model", p["model"], "--out", str(out), "--force"],
                                             out.parent / f"{out.name}.export.log")}
    res["plans"] = []
    for profile, precision in p["plans"]:
        log_path = out.parent / f"{out.name}.plan-{profile}-{precision}.log"
        r = _time_v([*_cli(), "plan", "--model", p["model"], "--profile", profile, "--precision", precision], log_path)
        res["plans"].append({"profile": profile, "precision": precision, **r})
    return res


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def worker_optimum(p: dict[str, Any]) -> dict[str, Any]:
    """Optimum's ONNX exporter on the model saved as a diffusers folder (save time reported apart)."""
    cli = OPTIMUM_VENV / "bin" / "optimum-cli"
    if not cli.exists():
        return {"skipped": f"{cli} not found (Optimum needs its own venv: optimum-onnx pins transformers < 4.58; `make optimum-venv` makes it, or set KOALA_OPTIMUM_VENV)"}
    have = mem_available_gib()
    if have < p["need_gib"]:
        return {"skipped": f"only {have:.1f} GiB available; Optimum's export needs about {p['need_gib']} GiB"}
    folder, out = Path(p["folder"]), Path(p["out"])
    res: dict[str, Any] = {"mem_available_gib_before": round(have, 1)}
    if not (folder / "model_index.json").exists():
        from exporter.sources import resolve
        from koala_core.meter import Meter

        with Meter() as m:
            resolve(p["model"]).pipeline().save_pretrained(str(folder))
        res["save_pretrained"] = {"wall_s": round(m.seconds, 1), "peak_rss_gib": round(m.peak_rss_mb / 1024, 2)}
    _slow_tokenizer_files(folder)
    if out.exists():
        shutil.rmtree(out)
    versions = subprocess.run([str(OPTIMUM_VENV / "bin" / "python"), "-c",
                               "import importlib.metadata as m; print(*(m.version(p) for p in "
                               "('optimum-onnx','optimum','transformers','diffusers','torch','onnx')))"],
                              capture_output=True, text=True).stdout.split()
    res["versions"] = dict(zip(("optimum-onnx", "optimum", "transformers", "diffusers", "torch", "onnx"), versions))
    res["export"] = _time_v([str(cli), "export", "onnx", "--model", str(folder), "--task", "text-to-image", str(out)],
                            out.parent / f"{out.name}.log")
    res["files_gib"] = round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30, 2) if out.exists() else None
    return res


def _slow_tokenizer_files(folder: Path) -> None:
    """transformers 5 saves CLIP tokenizers as tokenizer.json only; Optimum's transformers 4.57 loads
    CLIPTokenizer from vocab.json + merges.txt. Write those two from the same BPE model (same tokens)."""
    for sub in ("tokenizer", "tokenizer_2"):
        d = folder / sub
        if not (d / "tokenizer.json").exists() or (d / "vocab.json").exists():
            continue
        model = json.loads((d / "tokenizer.json").read_text())["model"]
        (d / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def worker_gpu_probe(p: dict[str, Any]) -> dict[str, Any]:
    """What this machine offers for the GPU rows: CUDA in torch, ORT's CUDA provider, TensorRT."""
    out: dict[str, Any] = {}
    try:
        import torch

        out["torch_cuda"] = bool(torch.cuda.is_available())
        out["torch_cuda_why"] = (torch.cuda.get_device_name() if out["torch_cuda"] else
                                 f"torch {torch.__version__} has no usable CUDA device (built with CUDA: {torch.version.cuda})")
    except ImportError as e:
        out["torch_cuda"], out["torch_cuda_why"] = False, str(e)
    try:
        import onnxruntime as ort

        out["ort_cuda"] = "CUDAExecutionProvider" in ort.get_available_providers()
        out["ort_cuda_why"] = f"onnxruntime {ort.__version__} providers: {', '.join(ort.get_available_providers())}"
    except ImportError as e:
        out["ort_cuda"], out["ort_cuda_why"] = False, str(e)
    try:
        import tensorrt  # noqa: F401

        out["tensorrt"], out["tensorrt_why"] = True, f"tensorrt {tensorrt.__version__}"
    except ImportError as e:
        out["tensorrt"], out["tensorrt_why"] = False, f"tensorrt is not installed ({e})"
    return out


WORKERS = {"matmul": worker_matmul, "flops": worker_flops, "export": worker_export, "optimum": worker_optimum,
           "gpu_probe": worker_gpu_probe}


def worker_main(name: str, params: str, result: Path) -> int:
    from koala_core.machine import load_average

    start = load_average()
    t = time.perf_counter()
    out = WORKERS[name](json.loads(params))
    out.update(load_average_start=start, load_average_end=load_average(), worker_wall_s=round(time.perf_counter() - t, 1))
    result.write_text(json.dumps(out, indent=1))
    return 0


# ----- orchestration ---------------------------------------------------------------------------------

class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads),
                    "OPENBLAS_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    def worker(self, name: str, heavy: bool = True, **params: Any) -> dict[str, Any]:
        """Run one worker in a child process (under the heavy-job lock in the full run)."""
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result = Path(f.name)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--params", json.dumps(params),
               "--result", str(result)]
        if heavy and not self.args.quick:
            cmd = ["flock", LOCK, *cmd]
        log(f"[{time.strftime('%H:%M:%S')}] {name} {json.dumps(params)}")
        t = time.perf_counter()
        rc = subprocess.run(cmd, env=self.env, cwd=REPO).returncode
        try:
            out = json.loads(result.read_text()) if rc == 0 else {"error": f"worker {name} exited {rc}"}
        except json.JSONDecodeError:
            out = {"error": f"worker {name} wrote no result (exit {rc})"}
        result.unlink(missing_ok=True)
        out["wall_with_lock_wait_s"] = round(time.perf_counter() - t, 1)
        log(f"    -> {summary_line(out)}")
        return out

    def cli_bench(self, tag: str, *cli_args: str) -> dict[str, Any]:
        """`koala-trt bench ... --json` in a child process. One backend: the child holds the lock in the
        full run; a list (-b a,b): koala-trt bench runs each backend in a process of its own, holding
        the lock (--lock) while each one runs."""
        side_by_side = "," in cli_args[list(cli_args).index("--backend") + 1]
        cmd = [*_cli(), "bench", *cli_args, "--json", "--csv", str(self.args.out / f"bench-{tag}.csv")]
        if side_by_side and not self.args.quick:
            cmd += ["--lock", LOCK]
        shown = "koala-trt " + " ".join(cmd[3:])
        if not side_by_side and not self.args.quick:
            cmd = ["flock", LOCK, *cmd]
        log(f"[{time.strftime('%H:%M:%S')}] {shown}")
        p = subprocess.run(cmd, env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        (self.args.out / f"bench-{tag}.log").write_text(p.stderr)
        try:
            data = json.loads(p.stdout)
        except json.JSONDecodeError:
            return {"command": shown, "error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]}
        return {"command": shown, **data}  # a side-by-side run prints its JSON even when one backend failed

    def unet_args(self, runs: int | None = None, warmup: int | None = None) -> list[str]:
        """One U-Net step at the CFG batch (--batch is the U-Net's: 2 x images)."""
        a = self.args
        return ["--height", str(a.size), "--width", str(a.size), "--batch", str(a.batch // 2), "--threads", str(a.threads),
                "-c", "unet", "--no-end-to-end", "--warmup", str(a.warmup if warmup is None else warmup),
                "--runs", str(a.runs if runs is None else runs)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def summary_line(r: dict[str, Any]) -> str:
    if "error" in r or "skipped" in r:
        return r.get("error") or r["skipped"]
    return ", ".join(f"{k}={v}" for k, v in r.items() if isinstance(v, (int, float, str)) and k != "command")[:300]


def ensure_fp32(r: Runner, results: dict[str, Any]) -> str:
    """The FP32 artifacts: --fp32, else the export section's output, else export now."""
    a = r.args
    if a.fp32:
        return str(a.fp32)
    out = a.out / f"art-{a.tag}"
    if (out / "manifest.json").exists():
        return str(out)
    if a.quick:
        subprocess.run([*_cli(), "export", "--model", a.model, "--out", str(out), "--force"], env=r.env, cwd=REPO, check=True)
    else:
        results["export"] = r.worker("export", model=a.model, out=str(out), plans=PLANS)
    return str(out)


def ensure_int8(r: Runner, fp32: str) -> str | None:
    """The INT8 (Q/DQ, ONNX Runtime layout) artifacts: --int8 (`none`: no INT8 row), else calibrate +
    quantize now (small calibration: --calib-num prompts x --calib-steps steps at --calib-size px;
    ranges, not accuracy)."""
    a = r.args
    if a.int8 is not None:
        return None if str(a.int8) == "none" else str(a.int8)
    calib, out = a.out / f"calib-{a.tag}", a.out / f"art-{a.tag}-int8ort"
    if (out / "manifest.json").exists():
        return str(out)
    lock = [] if a.quick else ["flock", LOCK]
    subprocess.run([*lock, *_cli(), "calibrate", "--model", a.model, "--out", str(calib), "--num", str(a.calib_num),
                    "--steps", str(a.calib_steps), "--height", str(a.calib_size), "--width", str(a.calib_size), "--force"],
                   env=r.env, cwd=REPO, check=True)
    subprocess.run([*lock, *_cli(), "quantize", "--onnx", fp32, "--calib", str(calib), "--out", str(out),
                    "--target", "onnxruntime", "--samples", str(a.calib_num * a.calib_steps), "--threads", str(a.threads),
                    "--no-accuracy", "--force"], env=r.env, cwd=REPO, check=True)
    return str(out)


def unet_backends(chosen: str | None = None) -> list[str]:
    """The side-by-side U-Net rows (--backends, else): PyTorch FP32 first (the reference of every error),
    ONNX Runtime, OpenVINO FP32 where it is installed, and the BF16 rows where the CPU has BF16 hardware."""
    import importlib.util

    if chosen:
        return chosen.split(",")

    from koala_core.machine import resolve_cpu_precision

    bf16 = resolve_cpu_precision("auto") == "bf16"
    rows = ["torch", *(["torch:bf16"] if bf16 else []), "onnxruntime"]
    if importlib.util.find_spec("openvino") is not None:
        rows += ["openvino:fp32", *(["openvino:bf16"] if bf16 else [])]
    return rows


PLANS = [["rtx4090", "fp16"], ["l4", "int8"], ["jetson-agx-orin", "fp16"]]


def run_sections(r: Runner, sections: list[str], results: dict[str, Any], save: Any = lambda: None) -> None:
    """Run the chosen sections in order; `save()` after each, so a later failure loses nothing."""
    a = r.args
    shape = {"batch": a.batch, "height": a.size, "width": a.size}
    if "matmul" in sections:
        results["matmul"] = r.worker("matmul", n=a.gemm_n, runs=5, threads=a.threads)
    save()
    if "export" in sections:
        out = a.out / f"art-{a.tag}"
        results["export"] = r.worker("export", model=a.model, out=str(out), plans=PLANS)
    save()
    if "unet" in sections or "flops" in sections:
        fp32 = ensure_fp32(r, results)
        u: dict[str, Any] = {"flops": r.worker("flops", heavy=False, model=a.model, **shape)}
        u["side_by_side"] = r.cli_bench("unet", "--artifacts", fp32, "--backend", ",".join(unet_backends(a.backends)), *r.unet_args())
        int8 = ensure_int8(r, fp32)
        if int8 is not None:
            u["int8"] = r.cli_bench("unet-int8", "--artifacts", int8, "--backend", "onnxruntime", *r.unet_args())
        results["unet"] = u
    save()
    if "ratio" in sections:
        results["ratio"] = {"flops": r.worker("flops", heavy=False, model=a.big, **shape),
                            "big": r.cli_bench("ratio", "--model", a.big, "--backend", "torch", *r.unet_args(runs=a.big_runs, warmup=1))}
    save()
    if "components" in sections:
        fp32 = ensure_fp32(r, results)
        results["components"] = r.cli_bench("components", "--artifacts", fp32, "--backend", "onnxruntime,torch",
                                             "--threads", str(a.threads), "--height", str(a.size), "--width", str(a.size),
                                             "--warmup", str(a.warmup), "--runs", str(a.runs),
                                             "-c", "text_encoder,text_encoder_2,vae_decoder", "--no-end-to-end")
    save()
    if "e2e" in sections:
        fp32 = ensure_fp32(r, results)
        results["e2e"] = r.cli_bench("e2e-ort", "--artifacts", fp32, "--backend", "onnxruntime", "--threads", str(a.threads),
                                     "--height", str(a.size), "--width", str(a.size), "--steps", str(a.e2e_steps),
                                     "--warmup", str(a.e2e_warmup), "--runs", str(a.e2e_runs), "-c", "")
    save()
    if "optimum" in sections:
        results["optimum"] = r.worker("optimum", model=a.model, folder=str(a.out / f"diffusers-{a.tag}"),
                                      out=str(a.out / f"optimum-{a.tag}"), need_gib=a.optimum_need_gib)
    save()
    if "gpu" in sections:
        probe = r.worker("gpu_probe", heavy=False)
        g: dict[str, Any] = {"probe": probe}
        if not probe.get("torch_cuda"):
            g["skipped"] = f"no CUDA here: {probe.get('torch_cuda_why')}; {probe.get('ort_cuda_why')}; {probe.get('tensorrt_why')}"
            log(f"gpu section skipped: {g['skipped']}")
        else:
            if probe.get("ort_cuda"):  # onnxruntime-gpu: koala-trt's onnxruntime backend runs on its CUDA provider
                g["ort_cuda_fp32"] = r.cli_bench("gpu-ort", "--artifacts", ensure_fp32(r, results), "--backend", "onnxruntime",
                                                 *r.unet_args(runs=10, warmup=2))
            else:
                g["ort_cuda_skipped"] = probe.get("ort_cuda_why")
            if probe.get("tensorrt") and a.engines:
                g["tensorrt"] = r.cli_bench("gpu-trt", "--backend", "tensorrt", "--engines", str(a.engines), *r.unet_args(runs=10, warmup=2))
            else:
                g["tensorrt_skipped"] = probe.get("tensorrt_why") if not probe.get("tensorrt") else \
                    "no --engines folder given (build one with `koala-trt build`)"
        results["gpu"] = g
    save()


# ----- report ----------------------------------------------------------------------------------------

def _f(v: float | None, d: int = 2) -> str:
    return "—" if v is None else f"{v:,.{d}f}"


def _la(r: dict[str, Any]) -> str:
    """The 1-minute load average when a figure started and ended (workers), or when it ended (koala-trt bench)."""
    la = r.get("load_average_start")
    if la:
        return "/".join(f"{x:.2f}" for x in la[:1] + (r.get("load_average_end") or [])[:1])
    end = r.get("machine", {}).get("load_average")
    return f"{end[0]:.2f} (end)" if end else "—"


def unet_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The U-Net section as rows: each backend's step (koala-trt bench's record) with its error against
    the first row."""
    u = results.get("unet", {})
    runs = list(u.get("side_by_side", {}).get("backends", []))
    if "side_by_side" in u and "backends" not in u["side_by_side"]:
        runs.append({"entry": "side by side", "error": u["side_by_side"].get("error")})
    if "int8" in u:
        x = u["int8"]
        runs.append({**x, "entry": "onnxruntime (INT8 Q/DQ folder)"})
    return runs


def report(results: dict[str, Any]) -> str:
    lines: list[str] = []
    m = results.get("machine", {})
    lines.append(f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB RAM, SIMD {' '.join(m.get('simd', []))}")
    lines.append(f"Versions: {json.dumps(m.get('versions', {}))}")
    a = results.get("args", {})
    lines.append(f"Shape: {a.get('size')}x{a.get('size')}, batch {a.get('batch')}; threads {a.get('threads')}; "
                 f"warm-up {a.get('warmup')}, runs {a.get('runs')}")
    mm = results.get("matmul")
    peak = mm.get("peak_gflops") if mm and "peak_gflops" in mm else None
    if mm and peak:
        lines += ["", f"### fp32 GEMM peak ({mm['n']}x{mm['n']}, {mm['threads']} threads)", "| library | best GFLOP/s | load avg (start/end) |",
                  "|---|---|---|", f"| torch | {mm['torch']['gflops']:.1f} | {_la(mm)} |",
                  f"| numpy ({mm.get('numpy_blas')}) | {mm['numpy']['gflops']:.1f} | |"]
    u = results.get("unet")
    flops = (u or {}).get("flops", {}).get("flops")
    if u:
        rows = unet_rows(results)
        base = next((r["components"]["unet"]["median"] for r in rows if "error" not in r and "unet" in r.get("components", {})), None)
        ref = u.get("side_by_side", {}).get("reference")
        lines += ["", f"### One U-Net step ({a.get('model')}; `koala-trt bench -c unet --no-end-to-end`, errors against {ref})",
                  f"| backend | median s | p90 s | min–max s | vs {ref} | GFLOP/s | % of GEMM peak | unet rel L2 | peak RSS GiB | load avg |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for x in rows:
            c = x.get("components", {}).get("unet")
            if "error" in x or c is None:
                lines.append(f"| {x['entry']} | {x.get('error', 'not run')} | | | | | | | | |")
                continue
            rate = flops / c["median"] / 1e9 if flops else None
            err = x.get("against", {}).get("unet.out_sample", {}).get("rel_l2")
            lines.append(f"| {x['entry']} ({x['backend_detail']}) | {c['median']:.2f} | {c['p90']:.2f} | {c['min']:.2f}–{c['max']:.2f} | "
                         f"{_f(base / c['median'] if base else None)}x | {_f(rate, 1)} | {_f(100 * rate / peak if rate and peak else None, 1)} | "
                         f"{'—' if err is None else f'{err:.2g}'} | {c['peak_memory_mb'] / 1024:.2f} | {_la(x)} |")
        if flops:
            lines.append(f"\nFLOPs per step (torch.utils.flop_counter, batch {a.get('batch')}): {flops / 1e9:,.1f} GFLOP; "
                         f"parameters {u['flops'].get('parameters', 0) / 1e6:.1f} M")
    rt = results.get("ratio", {})
    big = rt.get("big", {}).get("components", {}).get("unet")
    koala = next((x["components"]["unet"] for x in unet_rows(results) if x.get("entry") == "torch" and "components" in x), None)
    if big and koala:
        ratio = big["median"] / koala["median"]
        card = MODEL_CARD["sdxl-base_s"] / MODEL_CARD["koala-700m_s"]
        kf, bf = (u or {}).get("flops", {}), rt.get("flops", {})
        lines += ["", "### KOALA vs SDXL-Base U-Net step (`koala-trt bench --backend torch`, FP32, same shape)",
                  "| model | parameters M | median s | min–max s | GFLOP/step | peak RSS GiB |", "|---|---|---|---|---|---|"]
        for name, x, f in ((a.get("model"), koala, kf), (a.get("big"), big, bf)):
            lines.append(f"| {name} | {_f(f.get('parameters', 0) / 1e6, 1)} | {x['median']:.2f} | {x['min']:.2f}–{x['max']:.2f} | "
                         f"{_f(f.get('flops', 0) / 1e9, 1)} | {x['peak_memory_mb'] / 1024:.2f} |")
        lines.append(f"\nSDXL-Base / KOALA step-time ratio: {ratio:.2f}x (model card, {MODEL_CARD['gpu']}, "
                     f"{MODEL_CARD['steps']} steps: {MODEL_CARD['sdxl-base_s']} / {MODEL_CARD['koala-700m_s']} s = {card:.2f}x)")
        if kf.get("flops") and bf.get("flops"):
            lines.append(f"FLOP ratio: {bf['flops'] / kf['flops']:.2f}x")
    c = results.get("components")
    if c:
        lines += ["", "### Components (`koala-trt bench -b onnxruntime,torch`)"]
        if "backends" in c:
            from koala_trt.commands.bench import side_by_side_table

            lines += ["```", side_by_side_table(c), "```", f"`{c['command']}`"]
        else:
            lines.append(f"Components: {c.get('error')}")
    e = results.get("e2e")
    if e:
        if e.get("end_to_end"):
            x = e["end_to_end"]
            lines += ["", "### End to end (`koala-trt bench`, onnxruntime)",
                      f"{e['width']}x{e['height']}, {e['steps']} steps: median {x['median']:.2f} s, p90 {x['p90']:.2f} s over {x['runs']} run(s); "
                      f"{e['images_per_minute']:.3f} images/minute; peak RSS {e['memory']['peak_mb'] / 1024:.2f} GiB; "
                      f"load average {e.get('machine', {}).get('load_average')}", f"`{e['command']}`"]
        else:
            lines += ["", f"End to end: {e.get('error')}"]
    ex = results.get("export")
    if ex and "export" in ex:
        lines += ["", "### Export and build plan (wall time; peak RSS of the process tree, polled)", "| step | wall s | peak RSS GiB | exit | load avg |", "|---|---|---|---|---|",
                  f"| koala-trt export (all components, checked) | {ex['export']['wall_s']} | {ex['export']['peak_rss_gib']} | {ex['export']['rc']} | {_la(ex)} |"]
        for pl in ex.get("plans", []):
            lines.append(f"| koala-trt plan --profile {pl['profile']} --precision {pl['precision']} | {pl['wall_s']} | {pl['peak_rss_gib']} | {pl['rc']} | |")
    op = results.get("optimum")
    if op:
        if "export" in op:
            lines += [f"| Optimum export onnx --task text-to-image ({op.get('versions', {}).get('optimum-onnx', '?')}) | {op['export']['wall_s']} | "
                      f"{op['export']['peak_rss_gib']} | {op['export']['rc']} | {_la(op)} |"]
            if "save_pretrained" in op:
                lines.append(f"| (save_pretrained of the diffusers folder for Optimum) | {op['save_pretrained']['wall_s']} | "
                             f"{op['save_pretrained']['peak_rss_gib']} | 0 | |")
        else:
            lines += ["", f"Optimum: {op.get('skipped') or op.get('error')}"]
    g = results.get("gpu")
    if g:
        lines += ["", "### GPU", g.get("skipped") or json.dumps({k: v.get("components", {}).get("unet", v.get("error")) if isinstance(v, dict) else v
                                                                 for k, v in g.items() if k != "probe"}, indent=1)]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"


def write_benchmarks(path: Path, text: str, results: dict[str, Any]) -> None:
    """Replace what lies between the two markers of `path` with this run's tables (atomically)."""
    from koala_core.atomic import staged_file
    from koala_core.errors import UsageError

    page = path.read_text(encoding="utf-8")
    if page.count(BEGIN) != 1 or page.count(END) != 1 or page.index(BEGIN) > page.index(END):
        raise UsageError(f"{path} has no `{BEGIN}` ... `{END}` block to rewrite")
    head, rest = page.split(BEGIN)
    _, tail = rest.split(END)
    when = time.strftime("%d %b %Y", time.gmtime())
    block = f"{BEGIN}\nLast run: {when}, `{results.get('command', 'scripts/bench.py')}`.\n\n{text.strip()}\n{END}"
    with staged_file(path) as tmp:
        tmp.write_text(head + block + tail, encoding="utf-8")


def unet_chart(results: dict[str, Any], path: Path) -> bool:
    """The U-Net section's side-by-side record as `koala-trt bench --plot` draws it; False when there is none."""
    doc = results.get("unet", {}).get("side_by_side")
    if not doc or "backends" not in doc or not any("error" not in b for b in doc["backends"]):
        return False
    from validation.bench_plot import plot

    plot(doc, path)
    return True


def main() -> int:
    if "--worker" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--worker", choices=sorted(WORKERS))
        ap.add_argument("--params", default="{}")
        ap.add_argument("--result", type=Path)
        w = ap.parse_args()
        return worker_main(w.worker, w.params, w.result)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--quick", action="store_true", help="random:tiny / random:tiny-sdxl at the model's native size, no lock")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    ap.add_argument("--model", help="the KOALA model [random:koala-700m; --quick: random:tiny]")
    ap.add_argument("--big", help="the model to compare against [random:sdxl-base; --quick: random:tiny-sdxl]")
    ap.add_argument("--size", type=int, help="image side in px [1024; --quick: the model's native size]")
    ap.add_argument("--batch", type=int, default=2, help="U-Net batch, 2 x images with CFG (2 = one image)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--big-runs", type=int, default=2, help="timed runs of the --big U-Net step")
    ap.add_argument("--e2e-steps", type=int, default=2)
    ap.add_argument("--e2e-warmup", type=int, default=1)
    ap.add_argument("--e2e-runs", type=int, default=1)
    ap.add_argument("--gemm-n", type=int, default=4096)
    ap.add_argument("--backends", help="the unet section's rows, as `koala-trt bench --backend` takes them; the first is the "
                    "reference of the errors [torch,torch:bf16,onnxruntime,openvino:fp32,openvino:bf16: the BF16 rows where the "
                    "CPU has BF16, the OpenVINO rows where it is installed]")
    ap.add_argument("--fp32", type=Path, help="FP32 artifacts folder [the export section's output]")
    ap.add_argument("--int8", type=Path, help="INT8 (Q/DQ) artifacts folder, or `none` for no INT8 row [calibrate + quantize now]")
    ap.add_argument("--engines", type=Path, help="TensorRT engines folder for the GPU section")
    ap.add_argument("--calib-num", type=int, default=2)
    ap.add_argument("--calib-steps", type=int, default=2)
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--optimum-need-gib", type=float, default=19.0)
    ap.add_argument("--out", type=Path, help="results folder [out/bench, --quick: out/bench-quick; or $KOALA_BENCH_OUT/...]")
    ap.add_argument("--benchmarks", help="the page whose `make bench` block this run rewrites [BENCHMARKS.md; --quick: none]")
    args = ap.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    for flag in ("threads", "warmup", "runs", "big_runs", "e2e_steps", "e2e_runs", "gemm_n", "calib_num", "calib_steps", "calib_size"):
        v = getattr(args, flag)
        if v < (0 if flag == "warmup" else 1):
            ap.error(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'warmup' else 1} (got {v})")
    if args.batch < 2 or args.batch % 2:
        ap.error(f"--batch is the U-Net's CFG batch, 2 x images: an even number >= 2 (got {args.batch})")
    if args.size is not None and args.size < 1:
        ap.error(f"--size must be >= 1 (got {args.size})")
    args.model = args.model or ("random:tiny" if args.quick else "random:koala-700m")
    args.big = args.big or ("random:tiny-sdxl" if args.quick else "random:sdxl-base")
    if args.size is None:
        if args.quick:
            from exporter.sources import resolve

            args.size = resolve(args.model).default_size
        else:
            args.size = 1024
    args.tag = args.model.split(":")[-1].replace("/", "_")
    if args.benchmarks is None:
        args.benchmarks = "none" if args.quick else str(REPO / "BENCHMARKS.md")
    base = Path(os.environ.get("KOALA_BENCH_OUT", REPO / "out"))
    args.out = (args.out or base / ("bench-quick" if args.quick else "bench")).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    from koala_core.machine import machine_facts

    results["machine"] = machine_facts()
    results["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    t = time.perf_counter()
    r = Runner(args)
    try:
        run_sections(r, sections, results, save=lambda: results_path.write_text(json.dumps(results, indent=1) + "\n"))
    finally:
        results["wall_s"] = round(time.perf_counter() - t, 1)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        text = report(results)
        (args.out / "summary.md").write_text(text)
        print(text)
        if args.benchmarks != "none":
            page = Path(args.benchmarks)
            write_benchmarks(page, text, results)
            log(f"rewrote the `make bench` block of {page}")
        if importlib.util.find_spec("matplotlib") is not None and unet_chart(results, args.out / "unet.png"):
            log(f"chart: {args.out / 'unet.png'}")
    log(f"results: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
