"""`koala-trt bench`: per-component and end-to-end latency, peak memory and images per minute of a backend."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from koala_trt.commands.aid_options import check_vae_tile, vae_tile_option
from koala_trt.commands.scheduler_option import check_scheduler, scheduler_option
from koala_trt.commands.cache_options import cache_options
from koala_trt.commands.common import NON_NEGATIVE, POSITIVE, check_backend_sources, check_out_file, cpu_precision_option, json_option, log, print_json, progress_option, table, threads_option
from koala_core.errors import KoalaError, UsageError


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
    cpu = data.get("cpu_precision")
    if cpu:
        text += f"\nprecision: {', '.join(f'{c} {p}' for c, p in cpu['components'].items())} (CPU ISA {cpu['isa']})"
    return text


def write_csv(path: Path, rows: list[dict[str, Any]], backend_column: bool = False) -> None:
    """The rows of one backend, or (backend_column) of a side-by-side run with its backend and round columns."""
    from koala_core.atomic import staged_file
    from validation.bench import CSV_FIELDS

    with staged_file(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["backend", "round", *CSV_FIELDS] if backend_column else CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)


@click.command("bench")
@click.option("--artifacts", "-a", type=click.Path(path_type=Path),
              help="Artifacts folder (`koala-trt export`, `convert`, `quantize`): the graphs for onnxruntime; specs, tokenizers and defaults for all.")
@click.option("--backend", "-b", "backend_list", default="onnxruntime", show_default=True, metavar="NAME[:PRECISION][@FOLDER],...",
              help="What runs the networks: onnxruntime, openvino, tensorrt or torch. A comma-separated list runs each in a "
                   "process of its own and prints them side by side, with each one's error against the first on the same "
                   "inputs. openvino:fp32|bf16|auto sets its --cpu-precision, torch:bf16 runs PyTorch under bf16 autocast; NAME@FOLDER gives an onnxruntime or openvino entry an artifacts folder of its own (another precision of the same export).")
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
              help="Components to time one by one (comma-separated; empty for none): also vae_encoder, unet_deep, "
                   "unet_shallow, controlnet, unet_controlnet where the artifacts hold them, each U-Net graph at the CFG batch.")
@click.option("--end-to-end/--no-end-to-end", default=True, show_default=True, help="Also time the whole text-to-image loop.")
@threads_option()
@progress_option()
@vae_tile_option()
@scheduler_option()
@cache_options()
@cpu_precision_option()
@json_option("the results")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Also write one CSV row per component and end to end.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path),
              help="Also draw a PNG chart: the U-Net step and image time per entry with the spread of the runs and "
                   "each entry's error against the first (needs matplotlib, the `plot` extra).")
@click.option("--lock", "lock_path", type=click.Path(path_type=Path),
              help="Side by side: hold an exclusive lock (flock) on this file while each backend runs, so that other heavy "
                   "jobs of a shared machine wait for it, and it for them, between backends.")
@click.option("--rounds", type=POSITIVE, default=1, show_default=True,
              help="Side by side: run the whole list this many times (a,b,a,b,...); each stage's calls are pooled and "
                   "each speed-up is the median of the per-round ratios, so a host whose speed drifts over minutes "
                   "slows the compared backends alike.")
@click.option("--save-outputs", type=click.Path(path_type=Path), hidden=True,
              help="(side by side) write the last outputs of each component and the last images to this .npz file.")
def bench_cmd(artifacts: Path | None, backend_list: str, engines: Path | None, model: str | None, height: int | None,
              width: int | None, batch: int, steps: int | None, guidance: float | None, warmup: int, runs: int,
              components: str, end_to_end: bool, threads: int | None, vae_tile: int | None, cache_interval: int, cache_branch: int | None,
              cpu_precision: str | None, as_json: bool,
              csv_path: Path | None, lock_path: Path | None, rounds: int, save_outputs: Path | None,
              plot_path: Path | None, scheduler: str | None = None) -> None:
    """Latency (median, p90; warm-up excluded), peak memory and images per minute of one backend: each
    component alone (text encoders, one U-Net step at the CFG batch, VAE decode) and end to end
    through the sampler (tokenize .. VAE decode). Several backends (`-b onnxruntime,openvino:bf16,torch`)
    run one after another, each in its own process, into one table.

    Memory is the peak RSS of this process for CPU backends and device memory for GPU ones."""
    from exporter.specs import parse_components
    from validation.bench import BENCH_COMPONENTS, BenchOptions, parse_backends

    entries = parse_backends(backend_list, cpu_precision)
    comps = tuple(parse_components([components], default=())) if components.strip() else ()
    # In the table's order; a name it cannot time stays, for BenchOptions.check to name.
    comps = (*(c for c in BENCH_COMPONENTS if c in comps), *(c for c in comps if c not in BENCH_COMPONENTS))
    opts = BenchOptions(height=height, width=width, steps=steps, guidance=guidance, batch=batch, warmup=warmup, runs=runs,
                        components=comps, end_to_end=end_to_end,
                        keep_outputs=save_outputs is not None, vae_tile=vae_tile, scheduler=check_scheduler(scheduler),
                        cache_interval=cache_interval, cache_branch=cache_branch)
    opts.check()
    check_vae_tile(vae_tile)
    if csv_path is not None:
        check_out_file(csv_path, "--csv")
    if plot_path is not None:
        from validation.bench_plot import check_plot_path

        check_out_file(plot_path, "--plot")
        check_plot_path(plot_path)
        if "unet" not in opts.components and not end_to_end:
            raise UsageError("--plot draws the U-Net step and the image time: add unet to --components, or time end to end")
    if len(entries) > 1:
        check_list_sources(entries, artifacts, model, engines)
        if lock_path is not None:
            check_out_file(lock_path, "--lock")
        side_by_side(entries, artifacts=artifacts, engines=engines, model=model, threads=threads, opts=opts, components=components,
                     as_json=as_json, csv_path=csv_path, lock_path=lock_path, rounds=rounds, plot_path=plot_path)
        return
    if lock_path is not None:
        raise UsageError("--lock is for a list of backends (-b a,b): one backend runs in this process; wrap it in flock(1)")
    if rounds != 1:
        raise UsageError("--rounds is for a list of backends (-b a,b); for one backend, raise --runs")
    entry = entries[0]
    if entry.artifacts is not None:
        if artifacts is not None:
            raise UsageError(f"--backend {entry.label} names its artifacts folder; leave out --artifacts (or the @FOLDER)")
        artifacts = entry.artifacts
    backend = entry.name
    check_backend_sources(backend, artifacts, model, engines)
    if save_outputs is not None:
        check_out_file(save_outputs, "--save-outputs")
    result, data = bench_one(entry, artifacts=artifacts, engines=engines, model=model, threads=threads, opts=opts)
    if csv_path is not None:
        write_csv(csv_path, result.csv_rows())
    if save_outputs is not None:
        import numpy as np

        from koala_core.atomic import staged_file

        with staged_file(save_outputs) as tmp, tmp.open("wb") as f:
            np.savez(f, **result.outputs)
    if plot_path is not None:
        _plot(data, plot_path)
    if as_json:
        print_json(data)
    else:
        click.echo(result_table(data))


def _plot(doc: dict[str, Any], path: Path) -> None:
    from validation.bench_plot import plot

    plot(doc, path)
    log(f"chart: {path}")


def bench_one(entry: Any, artifacts: Path | None, engines: Path | None, model: str | None, threads: int | None,
              opts: Any) -> tuple[Any, dict[str, Any]]:
    """One backend in this process: open its pipeline, time it (validation/bench.py), its JSON record."""
    from sampler.loop import SAMPLER_COMPONENTS
    from sampler.pipeline import open_pipeline
    from validation.bench import run_bench

    backend = entry.name
    check_components(backend, artifacts, opts)
    pipe = open_pipeline(backend, artifacts=artifacts, engines=engines, model=model, threads=threads,
                         cpu_precision=entry.precision if backend == "openvino" else None,
                         torch_precision=entry.precision or "fp32" if backend == "torch" else "fp32", full_hash=False,
                         components=SAMPLER_COMPONENTS if opts.end_to_end else opts.components, model_from_artifacts=True, log=log,
                         cache=opts.cache_interval > 1)
    with pipe:
        result = run_bench(pipe.backend, pipe.assets, opts, log=log)
        precision_of = getattr(pipe.backend, "precision_of", None)
        cpu = ({"isa": pipe.backend.isa, "components": {c: precision_of(c) for c in pipe.backend.specs}}
               if precision_of is not None else None)
    data = result.to_json()
    data["entry"] = entry.label
    if cpu is not None:  # --backend openvino: the precision each component ran at, and the CPU's widest ISA
        data["cpu_precision"] = cpu
    data["source"] = str(engines or artifacts or pipe.model)
    return result, data


def check_components(backend: str, artifacts: Path | None, opts: Any) -> None:
    """The components this run times are in the artifacts folder of a backend that runs its graphs: end
    to end needs the sampler's four, components alone only themselves (a U-Net-only export times its U-Net)."""
    from exporter.manifest import load_manifest
    from runtime.backend import ONNX_BACKENDS
    from sampler.loop import loop_components

    if artifacts is None or backend not in ONNX_BACKENDS:
        return
    held = list(load_manifest(artifacts).components)
    loop = loop_components(opts.cache_interval)  # what the end-to-end text-to-image runs
    missing = [c for c in dict.fromkeys([*(loop if opts.end_to_end else ()), *opts.components]) if c not in held]
    if missing:
        why = (f"; end to end needs {', '.join(loop)}: time the components alone with --no-end-to-end"
               if opts.end_to_end and any(c in loop for c in missing) else "")
        raise UsageError(f"{artifacts} has no {', '.join(missing)} (it holds {', '.join(held)}){why}")


# ----- several backends side by side ---------------------------------------------------------------------

def check_list_sources(entries: list[Any], artifacts: Path | None, model: str | None, engines: Path | None) -> None:
    """check_backend_sources for a list: each input is read by some backend of the list, each backend
    has what it reads, each is installed, and the folders of `@FOLDER` entries hold the same model's
    components as --artifacts (the same inputs, so their errors compare); all before the first
    backend starts."""
    import importlib.util

    from runtime.backend import ONNX_BACKENDS

    names = [e.name for e in entries]
    onnx = [e for e in entries if e.name in ONNX_BACKENDS and e.artifacts is None]
    if onnx and artifacts is None:
        raise UsageError(f"--backend {onnx[0].label} needs --artifacts DIR (from `koala-trt export`) or an @FOLDER of its own")
    if model is not None and "torch" not in names:
        raise UsageError("--model is for --backend torch; onnxruntime, openvino and tensorrt read --artifacts / --engines")
    if engines is not None and "tensorrt" not in names:
        raise UsageError("--engines is for --backend tensorrt")
    if "tensorrt" in names and engines is None:
        raise UsageError("--backend tensorrt needs --engines DIR (a `koala-trt build` folder)")
    if "torch" in names and model is None and artifacts is None:
        raise UsageError("--backend torch needs --model (or --artifacts, whose source model it then builds)")
    folders = [f for f in [artifacts, *(e.artifacts for e in entries)] if f is not None]
    if folders:
        from exporter.manifest import load_manifest

        # a missing or broken folder: one line before any backend starts
        first, *others = [(f, load_manifest(f)) for f in folders]
        for folder, manifest in others:
            if (manifest.view.source, manifest.view.loras) != (first[1].view.source, first[1].view.loras):
                raise UsageError(f"{folder} is not of the model {first[0]} holds ({first[1].view.source.model}): "
                                 "a side-by-side run compares folders of one model, same weights and LoRA adapters")
    missing = {"openvino": "--backend openvino needs OpenVINO: pip install 'koala-trt[openvino]'",
               "torch": "--backend torch needs PyTorch: pip install 'koala-trt[export]'"}
    for name, message in missing.items():
        if name in names and importlib.util.find_spec(name) is None:
            raise UsageError(message)
    if "tensorrt" in names and importlib.util.find_spec("tensorrt") is None:
        raise KoalaError("the tensorrt backend is not available here (tensorrt is not installed); "
                         "it needs the [gpu] extra on a machine with an NVIDIA GPU")


def _child_args(entry: Any, artifacts: Path | None, engines: Path | None, model: str | None, threads: int | None,
                opts: Any, components: str) -> list[str]:
    """`koala-trt bench` options for one entry of the list, the same measurement as the others."""
    args = ["--backend", entry.backend, "--warmup", str(opts.warmup), "--runs", str(opts.runs), "--batch", str(opts.batch),
            "--components", components, "--end-to-end" if opts.end_to_end else "--no-end-to-end"]
    for flag, value in (("--height", opts.height), ("--width", opts.width), ("--steps", opts.steps),
                        ("--guidance", opts.guidance), ("--threads", threads), ("--vae-tile", opts.vae_tile),
                        ("--scheduler", opts.scheduler),
                        ("--cache-interval", opts.cache_interval if opts.cache_interval != 1 else None), ("--cache-branch", opts.cache_branch)):
        if value is not None:
            args += [flag, str(value)]
    folder = entry.artifacts or artifacts  # an @FOLDER entry reads its own folder
    if folder is not None:
        args += ["--artifacts", str(folder)]
    if entry.name == "torch" and model is not None:
        args += ["--model", model]
    if entry.name == "tensorrt" and engines is not None:
        args += ["--engines", str(engines)]
    return args


def run_child(entry: Any, args: list[str], work: Path, lock_path: Path | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """`koala-trt bench ARGS --json` in a process of its own (its peak memory its own); its log lines
    go to stderr prefixed with the entry. Returns (its JSON record, None) or (None, its error line)."""
    out_json, npz = work / "result.json", work / "outputs.npz"
    cmd = [sys.executable, "-m", "koala_trt.cli", "bench", *args, "--json", "--save-outputs", str(npz), "--csv", str(work / "rows.csv")]
    log(f"[{entry.label}] koala-trt bench {' '.join(args)}")
    last = ""
    with _locked(lock_path, entry.label), out_json.open("w") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip("\n")
            if line.strip():
                last = line
                log(f"[{entry.label}] {line}")
        rc = proc.wait()
    if rc != 0:
        return None, (last[len("Error: "):] if last.startswith("Error: ") else last) or f"exited with status {rc}"
    import json

    return json.loads(out_json.read_text()), None


class _locked:
    """An exclusive flock on `path` (none when path is None) for the time one backend runs."""

    def __init__(self, path: Path | None, label: str) -> None:
        self.path, self.label, self.f = path, label, None

    def __enter__(self) -> "_locked":
        if self.path is not None:
            import fcntl
            import time

            self.f = self.path.open("a")
            t = time.perf_counter()
            fcntl.flock(self.f, fcntl.LOCK_EX)
            waited = time.perf_counter() - t
            if waited >= 1:
                log(f"[{self.label}] waited {waited:.0f} s for the lock {self.path}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.f is not None:
            self.f.close()  # closing the file releases the lock


def side_by_side(entries: list[Any], artifacts: Path | None, engines: Path | None, model: str | None, threads: int | None,
                 opts: Any, components: str, as_json: bool, csv_path: Path | None, lock_path: Path | None = None,
                 rounds: int = 1, plot_path: Path | None = None) -> None:
    """Each entry in its own `koala-trt bench` process, one after another, the whole list `rounds` times;
    one table (or JSON) with each entry's outputs compared with the first's (the same inputs: spec dummy
    inputs, prompt and seed; compared on the first round) and its speed-up paired round by round."""
    import numpy as np

    from koala_core.machine import machine_facts, resolve_cpu_precision
    from validation.bench import compare_outputs, merge_rounds, paired_speedups

    for e in entries:
        if e.name == "openvino":
            resolve_cpu_precision(e.precision)  # bf16 on a CPU without it: before the first backend starts
    records: list[list[dict[str, Any]]] = [[] for _ in entries]
    errors: dict[int, str] = {}
    rows: list[dict[str, Any]] = []
    reference: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="koala-bench-") as tmp:
        for rnd in range(rounds):
            for i, e in enumerate(entries):
                if i in errors:
                    continue  # failed in an earlier round: its error stands
                work = Path(tmp) / f"{rnd}-{i}"
                work.mkdir()
                if rounds > 1:
                    log(f"[{e.label}] round {rnd + 1}/{rounds}")
                data, error = run_child(e, _child_args(e, artifacts, engines, model, threads, opts, components), work, lock_path)
                if data is None:
                    errors[i] = error or "failed"
                    continue
                data["entry"] = e.label  # the child knows its backend, not the @FOLDER it was listed with
                if rnd == 0:
                    with np.load(work / "outputs.npz") as z:
                        outputs = {k: z[k] for k in z.files}
                    if reference is None:
                        reference = {"entry": e.label, "index": i, "outputs": outputs}
                    else:
                        data["against"] = {"reference": reference["entry"], **compare_outputs(reference["outputs"], outputs)}
                records[i].append(data)
                if csv_path is not None:
                    with (work / "rows.csv").open(newline="", encoding="utf-8") as f:
                        rows += [{"backend": e.label, "round": rnd + 1, **r} for r in csv.DictReader(f)]
    runs = [{"entry": e.label, "error": errors[i]} if i in errors else merge_rounds(records[i]) for i, e in enumerate(entries)]
    if reference is not None and "error" not in runs[reference["index"]]:
        for i, r in enumerate(runs):
            if i != reference["index"] and "error" not in r:
                r["speedup"] = paired_speedups(runs[reference["index"]]["rounds"], r["rounds"])
    doc = {"backends": runs, "reference": reference["entry"] if reference else None, "rounds": rounds, "machine": machine_facts()}
    if csv_path is not None:
        write_csv(csv_path, rows, backend_column=True)
    if plot_path is not None and any("error" not in r for r in runs):
        _plot(doc, plot_path)
    if as_json:
        print_json(doc)
    else:
        click.echo(side_by_side_table(doc))
    failed = [r for r in runs if "error" in r]
    if failed:
        raise KoalaError("; ".join(f"{r['entry']}: {r['error']}" for r in failed))


def side_by_side_table(doc: dict[str, Any]) -> str:
    """Stages down, backends across: median latency (with the speed-up against the first backend, paired by round),
    peak memory, and each output's error against the first backend."""
    runs = doc["backends"]
    ok = [r for r in runs if "error" not in r]
    first = ok[0] if ok else None
    stages: list[str] = []
    for r in ok:
        stages += [c for c in r["components"] if c not in stages]
    rows = []

    def cell(r: dict[str, Any], rec: dict[str, Any] | None, stage: str) -> str:
        if rec is None:
            return "-"
        speedup = r.get("speedup", {}).get(stage)
        return _fmt_s(rec["median"]) + (f" ({speedup['median']:.2f}x)" if speedup else "")

    for stage in stages:
        rows.append([stage + (" (one step)" if stage == "unet" else ""),
                     *(r.get("error", "failed") if "error" in r else cell(r, r["components"].get(stage), stage) for r in runs)])
    if any(r.get("end_to_end") for r in ok):
        steps = next(r["end_to_end"]["steps"] for r in ok if r.get("end_to_end"))
        rows.append([f"end to end ({steps} steps)", *("-" if "error" in r else cell(r, r.get("end_to_end"), "end_to_end") for r in runs)])
    rows.append(["peak memory MiB", *("-" if "error" in r else f"{r['memory']['peak_mb']:,.0f}" for r in runs)])
    keys: list[str] = []
    for r in ok:
        keys += [k for k in r.get("against", {}) if k != "reference" and k not in keys]
    for k in keys:
        label = "images PSNR dB" if k == "images" else f"{k} rel L2"
        vals = []
        for r in runs:
            a = r.get("against", {}).get(k)
            if r is first:
                vals.append("(reference)")
            elif a is None:
                vals.append("-")
            elif k == "images":
                vals.append("identical" if a["psnr"] is None else f"{a['psnr']:.1f}")
            else:
                vals.append(f"{a['rel_l2']:.2g}" + (f" ({a['psnr']:.1f} dB)" if a.get("psnr") else ""))
        rows.append([label, *vals])
    text = table(rows, ["stage", *(r["entry"] for r in runs)])
    for r in ok:  # the backend's own description (openvino's names the precision of each component and the ISA)
        text += f"\n{r['entry']}: {r['backend_detail']}"
    m = doc["machine"]
    if ok:
        o = ok[0]
        n = doc.get("rounds", 1)
        rounds_note = (f" in {n} rounds (calls pooled; speed-ups the median of the per-round ratios)" if n > 1 else "")
        text += (f"\n{o['width']}x{o['height']}, {o['batch']} image(s), warm-up {o['warmup']}, runs {o['runs']}"
                 f"{rounds_note}; "
                 f"errors against {doc['reference']} on the same inputs; {m['cpu']}, {m['cores']} cores")
    return text
