"""A bounded load test of `koala-trt serve` on localhost (issue 16 item 5), and its overhead against
`koala-trt generate` on the same request.

    python scripts/serve_load.py --artifacts ART --clients 8 --requests 4 --size 128 --steps 2
    python scripts/serve_load.py --artifacts ART --clients 2 --requests 1 --size 512 --steps 4 --instances 2 --overhead

Starts `koala-trt serve` on free loopback ports, sends CLIENTS concurrent tritonclient HTTP clients
REQUESTS requests each (distinct seeds), and reports: answered/sent, wall seconds, images per minute,
p50/p90 latency, peak RSS of the server's process tree (tritonserver and its Python-backend stubs,
polled every 0.2 s) and, from Triton's metrics, how many U-Net requests ran in how many executions
(fewer executions than requests: steps of concurrent prompts were batched through the U-Net).

--overhead then sends one request alone (models warm) and runs `koala-trt generate --json` with the
same prompt, seed, steps, guidance and size after the server has stopped: overhead = served latency /
generate's sampling time (encode + denoise + decode, its `total_ms`) - 1, and whether the images are
equal. The server is stopped with SIGTERM at the end; its exit status must be 0.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench import _tree_rss_kb  # scripts/bench.py: VmRSS of a process and its descendants

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a koala in a tree, watercolor"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def request_inputs(th, seed: int, steps: int, size: int, guidance: float) -> list:
    out = []
    for name, array, dtype in (("prompt", np.array([PROMPT.encode()], dtype=np.object_), "BYTES"),
                               ("seed", np.array([seed], np.int64), "INT64"), ("steps", np.array([steps], np.int32), "INT32"),
                               ("guidance", np.array([guidance], np.float32), "FP32"),
                               ("height", np.array([size], np.int32), "INT32"), ("width", np.array([size], np.int32), "INT32")):
        i = th.InferInput(name, list(array.shape), dtype)
        i.set_data_from_numpy(array)
        out.append(i)
    return out


def unet_counts(metrics_port: int) -> tuple[int, int]:
    """koala_unet's successful requests and executions from Triton's Prometheus metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()

    def value(metric: str) -> int:
        m = re.search(rf'^{metric}{{model="koala_unet",version="1"}} (\S+)$', text, re.M)
        return int(float(m.group(1))) if m else -1

    return value("nv_inference_request_success"), value("nv_inference_exec_count")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", required=True, type=Path)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="per client")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--instances", type=int, default=2, help="pipeline model instances (koala-trt serve --instances)")
    ap.add_argument("--max-batch", type=int, help="koala-trt serve --max-batch (2: no U-Net batching across requests)")
    ap.add_argument("--overhead", action="store_true", help="then one request alone against `generate` on the same request")
    ap.add_argument("--ready-timeout", type=float, default=900.0)
    ap.add_argument("--request-timeout", type=float, default=3600.0)
    ap.add_argument("--json", type=Path, help="write the results here too")
    a = ap.parse_args()
    import tritonclient.http as th

    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "koala_trt.cli", "serve", "--artifacts", str(a.artifacts), "--backend", a.backend,
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--instances", str(a.instances)]
    if a.max_batch:
        cmd += ["--max-batch", str(a.max_batch)]
    log_path = Path(tempfile.mkstemp(prefix="serve-load-", suffix=".log")[1])
    with open(log_path, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    peak, stop = [0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            time.sleep(0.2)

    threading.Thread(target=poll, daemon=True).start()
    result: dict = {"command": " ".join(cmd[1:]), "clients": a.clients, "requests_per_client": a.requests,
                    "size": a.size, "steps": a.steps, "instances": a.instances, "max_batch": a.max_batch}
    try:
        t0, deadline = time.perf_counter(), time.monotonic() + a.ready_timeout
        while "serving model koala" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.5)
        result["ready_s"] = round(time.perf_counter() - t0, 1)
        latencies: list[float] = []
        lock = threading.Lock()

        def work(c: int) -> int:
            client = th.InferenceServerClient(f"127.0.0.1:{http}", connection_timeout=a.request_timeout, network_timeout=a.request_timeout)
            done = 0
            try:
                for k in range(a.requests):
                    t = time.perf_counter()
                    image = client.infer("koala", request_inputs(th, 1000 * c + k, a.steps, a.size, a.guidance)).as_numpy("image")
                    with lock:
                        latencies.append(time.perf_counter() - t)
                    done += int(image.shape == (a.size, a.size, 3))
            finally:
                client.close()
            return done

        before = unet_counts(metrics)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            answered = sum(pool.map(work, range(a.clients)))
        wall = time.perf_counter() - t0
        after = unet_counts(metrics)
        p50, p90 = np.percentile(latencies, [50, 90])
        result.update(answered=answered, sent=a.clients * a.requests, wall_s=round(wall, 2),
                      images_per_min=round(60 * answered / wall, 2), p50_s=round(float(p50), 2), p90_s=round(float(p90), 2),
                      unet_requests=after[0] - before[0], unet_executions=after[1] - before[1])
        served = None
        if a.overhead:
            client = th.InferenceServerClient(f"127.0.0.1:{http}", connection_timeout=a.request_timeout, network_timeout=a.request_timeout)
            try:
                t = time.perf_counter()
                served = client.infer("koala", request_inputs(th, 7, a.steps, a.size, a.guidance)).as_numpy("image")
                result["alone_s"] = round(time.perf_counter() - t, 2)
            finally:
                client.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                result["exit_status"] = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                result["exit_status"] = proc.wait()
        stop.set()
        result["server_peak_rss_gib"] = round(peak[0] / 2**20, 2)
    if a.overhead:
        from PIL import Image

        png = Path(tempfile.mkdtemp(prefix="serve-load-")) / "g.png"  # removed below
        g = subprocess.run([sys.executable, "-m", "koala_trt.cli", "generate", "--artifacts", str(a.artifacts), "--backend", a.backend,
                            "--prompt", PROMPT, "--seed", "7", "--steps", str(a.steps), "--guidance", str(a.guidance),
                            "--height", str(a.size), "--width", str(a.size), "--out", str(png), "--no-progress", "--json"],
                           cwd=ROOT, capture_output=True, text=True)
        if g.returncode != 0:
            print(g.stderr[-3000:], file=sys.stderr)
            return 1
        timings = json.loads(g.stdout)["timings"]
        result["generate_sampling_s"] = round(timings["total_ms"] / 1e3, 2)
        result["overhead_pct"] = round(100 * (result["alone_s"] / result["generate_sampling_s"] - 1), 1)
        result["same_image"] = bool(np.array_equal(served, np.asarray(Image.open(io.BytesIO(png.read_bytes())).convert("RGB"))))
        shutil.rmtree(png.parent, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = result.get("answered") == result.get("sent") and result.get("exit_status") == 0
    if ok:
        log_path.unlink()
    else:
        print(f"server log: {log_path}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
