"""`koala-trt bench`: per-component and end-to-end latency, peak memory and images per minute of a backend."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import click

from koala_trt.commands.common import NON_NEGATIVE, POSITIVE, check_backend_sources, check_out_file, log, print_json, table
from koala_core.errors import UsageError


def _fmt_s(v: float) -> str:
    return f"{v:,.2f} s" if v >= 10 else f"{1e3 * v:,.1f} ms" if v >= 0.01 else f"{1e3 * v:.3f} ms"


def result_table(data: dict[str, Any]) -> str:
    rows = []
    for name, c in data["components"].items():
        rows.append([name + (" (one step)" if name == "unet" else ""), str(c["batch"]), str(c["runs"]),
                     _fmt_s(c["median"]), _fmt_s(c["p90"]), f"{c['peak_memory_mb']:,.0f}"])
    e = data.get("end_to_end")
    if e:
        rows.append([f"end to end ({e['steps']} steps)", str(data["batch"]), str(e["runs"]), _fmt_s(e["median"]),
                     _fmt_s(e["p90"]), f"{e['peak_memory_mb']:,.0f}"])
    text = table(rows, ["stage", "batch", "runs", "median", "p90", f"peak {data['memory']['kind']} MiB"])
    if data.get("images_per_minute") is not None:
        text += f"\nimages per minute: {data['images_per_minute']:.3g} ({data['width']}x{data['height']}, {data['steps']} steps, " \
                f"guidance {data['guidance']:g}{'' if data['cfg'] else ', no CFG'})"
    return text


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from engines.bench import CSV_FIELDS
    from koala_core.atomic import staged_file

    with staged_file(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)


@click.command("bench")
@click.option("--artifacts", "-a", type=click.Path(path_type=Path),
              help="Artifacts folder (`koala-trt export`, `convert`, `quantize`): the graphs for onnxruntime; specs, tokenizers and defaults for all.")
@click.option("--backend", "-b", type=click.Choice(["onnxruntime", "tensorrt", "torch"]), default="onnxruntime", show_default=True,
              help="What runs the networks.")
@click.option("--engines", type=click.Path(path_type=Path), help="Engines folder from `koala-trt build` (--backend tensorrt).")
@click.option("--model", "-m", help="PyTorch reference for --backend torch [default: the model the artifacts were exported from].")
@click.option("--height", type=POSITIVE, help="Image height in pixels [default: the model's native size].")
@click.option("--width", type=POSITIVE, help="Image width in pixels [default: the model's native size].")
@click.option("--batch", type=POSITIVE, default=1, show_default=True, help="Images per request (the U-Net runs 2x this with CFG).")
@click.option("--steps", type=POSITIVE, help="Denoising steps of the end-to-end runs [default: the model's].")
@click.option("--guidance", type=float, help="Guidance scale; <= 1 turns CFG off [default: the model's].")
@click.option("--warmup", type=NON_NEGATIVE, default=1, show_default=True, help="Untimed calls (and end-to-end runs) before the timed ones.")
@click.option("--runs", type=POSITIVE, default=3, show_default=True, help="Timed calls per component and timed end-to-end runs.")
@click.option("--components", "-c", default="text_encoder,text_encoder_2,unet,vae_decoder", show_default=True,
              help="Components to time one by one (comma-separated; empty for none).")
@click.option("--end-to-end/--no-end-to-end", default=True, show_default=True, help="Also time the whole text-to-image loop.")
@click.option("--threads", type=POSITIVE, help="ONNX Runtime intra-op threads [default: all cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Also write one CSV row per component and end to end.")
def bench_cmd(artifacts: Path | None, backend: str, engines: Path | None, model: str | None, height: int | None,
              width: int | None, batch: int, steps: int | None, guidance: float | None, warmup: int, runs: int,
              components: str, end_to_end: bool, threads: int | None, as_json: bool, csv_path: Path | None) -> None:
    """Latency (median, p90; warm-up excluded), peak memory and images per minute of one backend: each
    component alone (text encoders, one U-Net step at the CFG batch, VAE decode) and end to end
    through the sampler (tokenize .. VAE decode).

    Memory is the peak RSS of this process for CPU backends and device memory for GPU ones."""
    from engines.bench import BenchOptions, run_bench
    from engines.runtime import open_backend
    from engines.sampler import SAMPLER_COMPONENTS, PipelineAssets
    from exporter.manifest import load_manifest
    from exporter.specs import parse_components

    comps = tuple(parse_components([components], default=())) if components.strip() else ()
    opts = BenchOptions(height=height, width=width, steps=steps, guidance=guidance, batch=batch, warmup=warmup, runs=runs,
                        components=tuple(c for c in SAMPLER_COMPONENTS if c in comps), end_to_end=end_to_end)
    if comps and len(opts.components) != len(comps):
        raise UsageError(f"cannot bench {', '.join(c for c in comps if c not in SAMPLER_COMPONENTS)}: "
                         f"the sampler's components are {', '.join(SAMPLER_COMPONENTS)}")
    opts.check()
    if csv_path is not None:
        check_out_file(csv_path, "--csv")
    check_backend_sources(backend, artifacts, model, engines)
    manifest = load_manifest(artifacts) if artifacts is not None else None
    if backend == "torch" and model is None:
        if manifest is None:
            raise UsageError("--backend torch needs --model (or --artifacts, whose source model it then builds)")
        model = manifest.data.get("source", {}).get("model")
        if not model:
            raise UsageError(f"{artifacts}/manifest.json records no source model; pass --model")
        log(f"torch: building {model} (the artifacts' source model)")
    if manifest is not None:
        from engines.artifacts_check import check_files

        prefixes = ["tokenizer/", "tokenizer_2/"]
        if backend == "onnxruntime":
            prefixes += [f"{c}/" for c in (SAMPLER_COMPONENTS if end_to_end else opts.components)]
        check_files(manifest, prefixes, full_hash=False)
        assets = PipelineAssets.from_manifest(manifest)
    elif backend == "torch":
        from exporter.sources import resolve

        assets = PipelineAssets.from_source(resolve(model))  # type: ignore[arg-type]
    else:
        assets = None
    runtime = open_backend(backend, artifacts=artifacts, engines=engines, model=model, manifest=manifest, threads=threads)
    try:
        if assets is None:
            em = runtime.manifest
            assets = PipelineAssets.from_engines(em.root, em.data, runtime.specs, {c: em.shape_range(c) for c in runtime.specs})
        result = run_bench(runtime, assets, opts, log=log)
    finally:
        runtime.close()
    data = result.to_json()
    data["source"] = str(engines or artifacts or model)
    if csv_path is not None:
        write_csv(csv_path, result.csv_rows())
    if as_json:
        print_json(data)
    else:
        click.echo(result_table(data))
