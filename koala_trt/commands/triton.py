"""`triton`: a Triton Inference Server model repository for serving at scale."""

from __future__ import annotations

from pathlib import Path

import click

from koala_trt.commands.common import POSITIVE, check_out_dir, cpu_precision_option, log, print_json, table
from koala_core.errors import UsageError


@click.command("triton")
@click.option("--artifacts", "-a", required=True, type=click.Path(path_type=Path),
              help="Artifacts folder (or unpacked bundle): specs, graphs, tokenizers, scheduler.")
@click.option("--engines", "-e", type=click.Path(path_type=Path),
              help="Engines folder from `koala-trt build`: components with an engine become tensorrt_plan models.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Model repository folder to write.")
@click.option("--name", default="koala", show_default=True, help="Pipeline model name; components become NAME_<component>.")
@click.option("--device", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="Instance kind of the ONNX models (engines always run on the GPU).")
@click.option("--max-batch", type=POSITIVE, help="Cap max_batch_size (default: each component's batch range maximum).")
@click.option("--instances", type=POSITIVE, default=1, show_default=True, help="Instances of the pipeline model (concurrent prompts).")
@click.option("--hardlink", is_flag=True, help="Hard-link graphs and engines instead of copying (same filesystem; skips the sha256 check).")
@click.option("--flavour", type=click.Choice(["production", "python"]), default="production", show_default=True,
              help="python: component models on the Python backend over koala-trt's runtime (servers without the ONNX Runtime/TensorRT backends).")
@click.option("--backend", "-b", type=click.Choice(["onnxruntime", "openvino"]), default="onnxruntime", show_default=True,
              help="--flavour python: koala-trt's runtime backend for the ONNX components (an engine runs on tensorrt).")
@cpu_precision_option()
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the models written as JSON.")
def triton_cmd(artifacts: Path, engines: Path | None, out: Path, name: str, device: str, max_batch: int | None,
               instances: int, hardlink: bool, flavour: str, backend: str, cpu_precision: str | None, force: bool,
               as_json: bool) -> None:
    """Write a Triton model repository: one model per component (ONNX Runtime or TensorRT) with config.pbtxt
    from the component specs, plus a Python-backend model that runs the sampler over them (prompt in, image out)."""
    from shipping.triton import write_repository

    if flavour != "python" and (backend != "onnxruntime" or cpu_precision is not None):
        raise UsageError("--backend and --cpu-precision are for --flavour python (production components run on Triton's own backends)")
    if cpu_precision is not None and backend != "openvino":
        raise UsageError(f"--cpu-precision is for --backend openvino (not {backend})")
    check_out_dir(out, force)
    r = write_repository(artifacts, out, engines, name=name, device=device, max_batch=max_batch,
                         instances=instances, hardlink=hardlink, force=force, log=log, flavour=flavour, runtime=backend,
                         runtime_options={"cpu_precision": cpu_precision} if cpu_precision else None)
    if as_json:
        print_json({"repository": str(r.path), "models": r.models})
        return
    rows = [[m, v["platform"], v["component"] or "(pipeline: prompt -> image)",
             str(v["max_batch_size"]) if v["batched"] else "0 (no batching)"] for m, v in r.models.items()]
    click.echo(table(rows, ["model", "platform", "component", "max_batch_size"]))
    if flavour == "python":
        click.echo(f"repository: {r.path}  (serve: koala-trt serve --repository {r.path})")
    else:
        click.echo(f"repository: {r.path}  (serve: tritonserver --model-repository {r.path}; the Python backend needs koala-trt installed)")
