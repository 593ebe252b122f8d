"""`make demo`: the main job on the built-in default model, end to end, through the real CLI.

Each step is one `koala-trt` command; the demo stops at the first failure with its exit code.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import shlex
import subprocess
import sys
import time
from pathlib import Path

from koala_trt.cli import main as koala_trt


def step(title: str, *args: str, fresh_process: bool = False) -> None:
    """One `koala-trt` command, in this process, or in a process of its own where it must choose its
    TensorRT library (Polygraphy, imported by earlier steps, fixes that choice once per process)."""
    print(f"\n=== {title}\n$ koala-trt {shlex.join(args)}", flush=True)
    t0 = time.perf_counter()
    if fresh_process:
        code = subprocess.call([sys.executable, "-c", "import sys; from koala_trt.cli import main; sys.exit(main(sys.argv[1:]))",
                                *args])
    else:
        code = koala_trt(list(args))
    if code != 0:
        print(f"demo: step failed with exit code {code}", file=sys.stderr)
        sys.exit(code)
    print(f"({time.perf_counter() - t0:.1f} s)", flush=True)


def fastest_cpu_backend(bench_csv: Path) -> tuple[str, str]:
    """The backend whose end-to-end median was lowest in the side-by-side bench's CSV, and why."""
    rows = [r for r in csv.DictReader(bench_csv.open(newline="", encoding="utf-8")) if r["stage"].startswith("end_to_end")]
    times = {r["backend"]: float(r["median"]) for r in rows}
    best = min(times, key=times.__getitem__)
    return best, ", ".join(f"{b} {t:.2f} s" for b, t in times.items()) + f" per image ({rows[0]['stage'].split('(')[1].rstrip(')')})"


def cpu_backends() -> list[str]:
    """The CPU backends installed here that run the artifacts: onnxruntime always, openvino where it is installed."""
    return ["onnxruntime", *(["openvino"] if importlib.util.find_spec("openvino") is not None else [])]


def run(model: str, out: Path) -> None:
    art, calib, fp16, int8 = out / "artifacts", out / "calib", out / "artifacts-fp16", out / "artifacts-int8"
    size = ["--height", "256", "--width", "256"]
    step("Inspect the model", "inspect", model)
    step("Export every component to ONNX, each checked against PyTorch", "export", "--model", model, "--out", str(art), "--force")
    step("Inspect the artifacts", "inspect", str(art))
    step("Record U-Net inputs along denoising trajectories (INT8 calibration)",
         "calibrate", "--model", model, "--out", str(calib), "--num", "4", "--steps", "10", *size, "--force")
    step("FP16 variant: FP32 islands where ranges demand them, VAE kept FP32",
         "convert", "--onnx", str(art), "--precision", "fp16", "--calib", str(calib), "--out", str(fp16), "--force")
    step("Validate the FP32 artifacts against PyTorch, per component and end to end (CI gate)",
         "validate", "--artifacts", str(art), *size, "--steps", "4",
         "--markdown", str(out / "validate.md"), "--junit", str(out / "validate.xml"), "--report", str(out / "validate.json"),
         "--html", str(out / "validate.html"))
    step("Validate the FP16 variant under the FP16 tolerances", "validate", "--artifacts", str(fp16), *size, "--steps", "4")
    step("INT8 variant: explicit Q/DQ in the U-Net (TensorRT layout)",
         "quantize", "--onnx", str(art), "--calib", str(calib), "--out", str(int8), "--force")
    backends = cpu_backends()
    bench_csv = out / "bench.csv"
    step("Benchmark the FP32 artifacts on the CPU backends installed here, side by side, each in its own process "
         "(per component and end to end, at the size the image below is made; errors against the first)"
         if len(backends) > 1 else "Benchmark the FP32 artifacts on ONNX Runtime (OpenVINO is not installed)",
         "bench", "--artifacts", str(art), "--backend", ",".join(backends), "--steps", "4", "--runs", "2", "--csv", str(bench_csv))
    backend, why = fastest_cpu_backend(bench_csv) if len(backends) > 1 else ("onnxruntime", "the one CPU backend installed here")
    print(f"fastest CPU backend here: {backend} ({why})", flush=True)
    step("GPU profiles", "profiles", "list")
    step("Memory plan: KOALA-700M on the paper's 8 GB RTX 3060 Ti at 1024x1024", "plan", "--model", "random:koala-700m", "--profile", "rtx3060ti")
    step("Memory plan: SDXL-Base on the same card", "plan", "--model", "random:sdxl-base", "--profile", "rtx3060ti")
    step("Real TensorRT-RTX engines for the RTX 3060 Ti, built on this machine without a GPU (FP16, FP32 VAE)",
         "build", "--onnx", str(art), "--onnx", str(fp16), "--profile", "rtx3060ti", "--out", str(out / "engines-rtx3060ti"),
         *size, "--batch", "1", "--force", fresh_process=True)
    step("The same for a datacenter card with standard TensorRT: the plan only (it builds on the card)",
         "build", "--onnx", str(art), "--onnx", str(fp16), "--profile", "l4", "--out", str(out / "engines-l4"),
         *size, "--batch", "1", "--dry-run", "--no-estimate")
    step("Bundle the artifacts for an edge device",
         "pack", "--artifacts", str(art), "--out", str(out / "artifacts.tar.gz"), "--force")
    step("Verify the bundle", "verify", str(out / "artifacts.tar.gz"))
    step("Triton model repository (one model per component + the sampler as a Python-backend model)",
         "triton", "--artifacts", str(art), "--out", str(out / "triton"), "--force")
    step(f"Generate an image on {backend}, the fastest CPU backend of the benchmark above (numpy sampler, no torch)",
         "generate", "--artifacts", str(art), "--backend", backend, "--prompt", "a koala climbing a eucalyptus tree at sunset",
         "--seed", "0", "--out", str(out / "koala.png"))
    print(f"\nartifacts: {art.resolve()}\nvalidation report (open in a browser): {(out / 'validate.html').resolve()}"
          f"\nimage: {(out / 'koala.png').resolve()} (made on {backend}: {why})")
    if model.startswith("random:"):
        print(f"note: {model} has random weights, so the image is coloured noise, not a koala; where the Hugging Face hub "
              "is reachable, `make demo DEMO_MODEL=etri-vilab/koala-700m` makes a real one")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--out", type=Path, default=Path("out"))
    a = p.parse_args()
    run(a.model, a.out)
