"""`serve`: the pipeline as Triton model `koala` on a real tritonserver (shipping/serve.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from koala_trt.commands.common import POSITIVE, check_backend_sources, cpu_precision_option, log
from koala_core.errors import UsageError


@click.command("serve")
@click.option("--artifacts", "-a", type=click.Path(path_type=Path),
              help="Artifacts folder from `koala-trt export` (specs, tokenizers, scheduler; the ONNX graphs for onnxruntime/openvino).")
@click.option("--engines", "-e", type=click.Path(path_type=Path), help="Engines folder from `koala-trt build` (--backend tensorrt).")
@click.option("--repository", "-r", type=click.Path(path_type=Path),
              help="Serve this model repository as it is (one `koala-trt triton --flavour python` wrote) instead of --artifacts.")
@click.option("--backend", "-b", type=click.Choice(["onnxruntime", "openvino", "tensorrt"]), default="onnxruntime", show_default=True,
              help="koala-trt runtime backend the component models run on.")
@cpu_precision_option()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (HTTP, gRPC and metrics); 0.0.0.0 for every interface.")
@click.option("--http-port", default=8000, show_default=True, help="KServe v2 HTTP port.")
@click.option("--grpc-port", default=8001, show_default=True, help="KServe v2 gRPC port.")
@click.option("--metrics-port", default=8002, show_default=True, help="Prometheus metrics port (GET /metrics).")
@click.option("--max-batch", type=POSITIVE, help="Cap each component's max_batch_size (2: one prompt's CFG pair, so no batching across requests).")
@click.option("--instances", type=POSITIVE, default=1, show_default=True, help="Instances of the pipeline model (prompts denoised concurrently).")
@click.option("--python-env", type=click.Path(path_type=Path),
              help="Serving environment (venv with numpy<2) the models run in [default: $KOALA_TRT_SERVE_ENV, else .venv-serve].")
def serve_cmd(artifacts: Path | None, engines: Path | None, repository: Path | None, backend: str, cpu_precision: str | None,
              host: str, http_port: int, grpc_port: int, metrics_port: int, max_batch: int | None, instances: int,
              python_env: Path | None) -> None:
    """Serve text-to-image as Triton model `koala` (inputs prompt, negative_prompt, seed, steps, guidance,
    height, width, scheduler; output image uint8 [H, W, 3]) until Ctrl-C or SIGTERM. The server is the tritonserver
    that nvidia-pytriton ships; each component runs on its Python backend over koala-trt's runtime."""
    from shipping.serve import Ports, check_address, check_repository, find_server, python_env as serving_env, serve

    if repository is not None:
        if artifacts is not None or engines is not None:
            raise UsageError("--repository serves a written repository as it is; omit --artifacts and --engines")
        if backend != "onnxruntime" or cpu_precision is not None or max_batch is not None or instances != 1:
            raise UsageError("--backend, --cpu-precision, --max-batch and --instances were fixed when the repository was "
                             "written (`koala-trt triton --flavour python`); omit them with --repository")
        check_repository(repository)
    else:
        if artifacts is None:
            raise UsageError("give --artifacts DIR (from `koala-trt export`) or --repository DIR")
        check_backend_sources("onnxruntime" if backend == "tensorrt" else backend, artifacts, None, None)
        if backend == "tensorrt" and engines is None:
            raise UsageError("--backend tensorrt needs --engines DIR (a `koala-trt build` folder)")
        if backend != "tensorrt" and engines is not None:
            raise UsageError("--engines is for --backend tensorrt")
        if cpu_precision is not None and backend != "openvino":
            raise UsageError(f"--cpu-precision is for --backend openvino (not {backend})")
    ports = Ports(http_port, grpc_port, metrics_port)
    check_address(host, ports)
    if engines is not None:  # an engine set: the folder of the card that runs here
        from engines.engine_set import resolve_engines

        engines = resolve_engines(engines, log=log)
    find_server()
    env_dir = serving_env(python_env)
    code = serve(artifacts, engines, host, ports, env_dir, instances=instances, log=log, runtime=backend,
                 cpu_precision=cpu_precision, max_batch=max_batch, repository=repository)
    sys.exit(code)
