"""Where one call of a component goes in OpenVINO on this CPU: a per-op profile from OpenVINO's own
performance counters (PERF_COUNT), grouped as attention, convolutions, GEMMs, normalization,
element-wise and layout changes, and, with --static, the same graph compiled for static shapes timed
beside the dynamic one (alternating, in one process): docs/bench.md, "Where a U-Net step goes".

    .venv/bin/python scripts/profile_openvino.py -a ARTIFACTS -c unet --size 1024 --cpu-precision bf16 --static

The model is compiled as the openvino backend compiles it (runtime/openvino_backend.py: the same
precision, the same FP32 phases in BF16, the same properties), plus PERF_COUNT; inputs are the
component spec's dummy inputs at the sampler's batch (the U-Net graphs at the CFG batch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from exporter.manifest import load_manifest  # noqa: E402
from exporter.metrics import error_stats  # noqa: E402
from exporter.specs import NUMPY_DTYPES  # noqa: E402
from runtime.openvino_backend import OpenVinoBackend, import_openvino  # noqa: E402

# OpenVINO CPU plugin node types (ProfilingInfo.node_type) by what they do. The plugin fuses each
# attention (MatMul, Softmax, MatMul) into a Subgraph named after the ONNX scaled_dot_product_attention
# node, told apart here by that name; the other Subgraphs are fused element-wise chains.
ATTENTION_SUBGRAPH = "Subgraph (attention)"
GROUPS = {
    "attention": (ATTENTION_SUBGRAPH, "ScaledDotProductAttention", "Softmax", "MatMul"),
    "convolution": ("Convolution", "GroupConvolution", "Deconvolution"),
    "GEMM (FullyConnected)": ("FullyConnected",),
    "normalization": ("MVN", "NormalizeL2", "RMS", "GroupNormalization"),
    "element-wise": ("Subgraph", "Eltwise", "Add", "Multiply", "Divide", "Subtract", "SwishCPU", "Gelu", "PowerStatic",
                     "Sin", "Cos", "Exp", "Sqrt", "Sigmoid", "Math", "Interpolate"),
    "layout (reorder, transpose, concat, split, slice)": ("Reorder", "Transpose", "Reshape", "Concat", "Split", "VariadicSplit",
                                                         "Slice", "StridedSlice", "Gather", "Broadcast", "ShapeOf", "Convert",
                                                         "Pad", "Tile"),
}


def group_of(node_type: str) -> str:
    return next((g for g, types in GROUPS.items() if node_type in types), "other")


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} vCPUs"
    return "?"


def feeds_for(backend: OpenVinoBackend, component: str, batch: int, size: int, seed: int) -> dict[str, np.ndarray]:
    spec = backend.specs[component]
    return {k: v.astype(NUMPY_DTYPES[spec.input(k).dtype], copy=False)
            for k, v in spec.dummy_inputs(batch, size, size, seed=seed).items()}


def profile(request: Any) -> dict[str, dict[str, Any]]:
    """Per node type: milliseconds (real time) of the last call, node count, exec types seen."""
    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"ms": 0.0, "nodes": 0, "exec": set()})
    for p in request.get_profiling_info():
        if p.status.name != "EXECUTED":
            continue
        kind = ATTENTION_SUBGRAPH if p.node_type == "Subgraph" and "attention" in p.node_name else p.node_type
        row = out[kind]
        row["ms"] += p.real_time.total_seconds() * 1e3
        row["nodes"] += 1
        row["exec"].add(p.exec_type)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-a", "--artifacts", type=Path, required=True)
    ap.add_argument("-c", "--component", default="unet")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=2, help="the component's batch (the U-Net's CFG batch is 2)")
    ap.add_argument("--cpu-precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--runs", type=int, default=3, help="profiled calls after one warm-up (their profiles are averaged)")
    ap.add_argument("--static", action="store_true", help="also time the graph compiled for these static shapes, alternating")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()

    ov = import_openvino()
    backend = OpenVinoBackend(load_manifest(a.artifacts), threads=a.threads, cpu_precision=a.cpu_precision)
    core = ov.Core()
    feeds = feeds_for(backend, a.component, a.batch, a.size, seed=0)
    config = backend.config(a.component)
    variants = {"dynamic": backend.model(a.component)}
    if a.static:
        static = backend.model(a.component)
        static.reshape({name: ov.PartialShape(list(v.shape)) for name, v in feeds.items()})
        variants["static"] = static
    compiled, requests, compile_s = {}, {}, {}
    for name, model in variants.items():
        t = time.perf_counter()
        compiled[name] = core.compile_model(model, "CPU", {**config, "PERF_COUNT": True})
        compile_s[name] = time.perf_counter() - t
        requests[name] = compiled[name].create_infer_request()
        print(f"{name}: compiled in {compile_s[name]:.1f} s", file=sys.stderr)

    def call(name: str) -> tuple[float, dict[str, np.ndarray]]:
        t = time.perf_counter()
        r = requests[name].infer(feeds)
        dt = time.perf_counter() - t
        return dt, {next(iter(port.get_names())): np.array(v, copy=True) for port, v in r.items()}

    times: dict[str, list[float]] = {n: [] for n in variants}
    profiles: dict[str, list[dict[str, dict[str, Any]]]] = {n: [] for n in variants}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    for name in variants:
        call(name)  # warm-up
    for i in range(a.runs):  # alternating: dynamic, static, dynamic, static, ...
        for name in variants:
            dt, outputs[name] = call(name)
            times[name].append(dt)
            profiles[name].append(profile(requests[name]))
            print(f"{name} run {i + 1}/{a.runs}: {dt:.3f} s (load {os.getloadavg()[0]:.2f})", file=sys.stderr)

    # The dynamic graph's profile, averaged over the runs, grouped.
    by_type: dict[str, dict[str, Any]] = {}
    for p in profiles["dynamic"]:
        for node_type, row in p.items():
            agg = by_type.setdefault(node_type, {"ms": 0.0, "nodes": row["nodes"], "exec": set()})
            agg["ms"] += row["ms"] / a.runs
            agg["exec"] |= row["exec"]
    total = sum(r["ms"] for r in by_type.values())
    groups: dict[str, float] = defaultdict(float)
    for node_type, row in by_type.items():
        groups[group_of(node_type)] += row["ms"]
    wall = float(np.median(times["dynamic"])) * 1e3

    print(f"\n{a.artifacts} {a.component}, batch {a.batch}, {a.size}x{a.size}, openvino {backend.version.split('-')[0]} "
          f"{backend.precision_of(a.component)}; {cpu()}; load {os.getloadavg()[0]:.2f}")
    print(f"median call {wall:.0f} ms; sum of executed nodes {total:.0f} ms ({total / wall:.0%} of the call)\n")
    print("| what | ms | share |\n|---|---|---|")
    for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {ms:.0f} | {ms / total:.1%} |")
    print("\n| node type | nodes | ms | share | exec types |\n|---|---|---|---|---|")
    for node_type, row in sorted(by_type.items(), key=lambda kv: -kv[1]["ms"])[:15]:
        print(f"| {node_type} | {row['nodes']} | {row['ms']:.0f} | {row['ms'] / total:.1%} | {', '.join(sorted(row['exec']))[:80]} |")
    result: dict[str, Any] = {
        "artifacts": str(a.artifacts), "component": a.component, "batch": a.batch, "size": a.size, "cpu": cpu(),
        "precision": backend.precision_of(a.component), "openvino": backend.version, "compile_s": compile_s,
        "times_s": times, "groups_ms": dict(groups),
        "node_types": {k: {**v, "exec": sorted(v["exec"])} for k, v in by_type.items()},
    }
    if a.static:
        ratios = [d / s for d, s in zip(times["dynamic"], times["static"])]
        err = {k: error_stats(outputs["dynamic"][k], outputs["static"][k]).rel_l2 for k in outputs["dynamic"]}
        print(f"\nstatic shapes: median {np.median(times['static']):.3f} s against dynamic {np.median(times['dynamic']):.3f} s, "
              f"per-round speed-up {min(ratios):.3f}-{max(ratios):.3f}x (median {np.median(ratios):.3f}x); "
              f"compile {compile_s['static']:.1f} s against {compile_s['dynamic']:.1f} s; rel L2 static vs dynamic {err}")
        result["static"] = {"ratios": ratios, "rel_l2_vs_dynamic": err}
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
