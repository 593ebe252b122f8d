"""`serve`: the pipeline as Triton model `koala` on a real tritonserver (shipping/serve.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from koala_trt.commands.common import check_backend_sources, log
from koala_core.errors import UsageError


@click.command("serve")
@click.option("--artifacts", "-a", type=click.Path(path_type=Path), required=True,
              help="Artifacts folder from `koala-trt export` (specs, tokenizers, scheduler; the ONNX graphs for onnxruntime).")
@click.option("--engines", "-e", type=click.Path(path_type=Path), help="Engines folder from `koala-trt build` (--backend tensorrt).")
@click.option("--backend", "-b", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="koala-trt runtime backend the component models run on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (HTTP, gRPC and metrics).")
@click.option("--http-port", default=8000, show_default=True, help="KServe v2 HTTP port.")
@click.option("--grpc-port", default=8001, show_default=True, help="KServe v2 gRPC port.")
@click.option("--metrics-port", default=8002, show_default=True, help="Prometheus metrics port (GET /metrics).")
@click.option("--python-env", type=click.Path(path_type=Path),
              help="Serving environment (venv with numpy<2) the models run in [default: $KOALA_TRT_SERVE_ENV, else .venv-serve].")
@click.option("--instances", default=1, show_default=True, help="Instances of the pipeline model (prompts denoised concurrently).")
def serve_cmd(artifacts: Path, engines: Path | None, backend: str, host: str, http_port: int, grpc_port: int,
              metrics_port: int, python_env: Path | None, instances: int) -> None:
    """Serve text-to-image as Triton model `koala` (inputs prompt, negative_prompt, seed, steps, guidance,
    height, width; output image uint8 [H, W, 3]) until Ctrl-C or SIGTERM. The server is the tritonserver
    that nvidia-pytriton ships; each component runs on its Python backend over koala-trt's runtime."""
    from shipping.serve import Ports, check_address, find_server, python_env as serving_env, serve

    check_backend_sources(backend, artifacts, None, engines)
    if backend == "tensorrt" and engines is None:
        raise UsageError("--backend tensorrt needs --engines DIR (a `koala-trt build` folder)")
    if instances < 1:
        raise UsageError(f"--instances must be at least 1 (got {instances})")
    ports = Ports(http_port, grpc_port, metrics_port)
    check_address(host, ports)
    find_server()
    env_dir = serving_env(python_env)
    code = serve(artifacts, engines, host, ports, env_dir, instances=instances, log=log)
    sys.exit(code)
