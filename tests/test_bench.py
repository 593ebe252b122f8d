"""`koala-trt bench` on random:tiny: the JSON fields, the CSV, the stage batches and bad input.
No timing assertions: only that every stage was measured and the numbers are consistent."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import run_cli
from engines.bench import BenchOptions, component_batches, latency_stats, run_bench
from engines.runtime import OnnxRuntimeBackend
from engines.sampler import SAMPLER_COMPONENTS, PipelineAssets, Request, Sampler
from exporter.manifest import load_manifest
from koala_core.machine import machine_facts

SIZE = ["--height", "128", "--width", "128"]


@pytest.fixture(scope="module")
def bench_run(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench") / "bench.csv"
    code, stdout, stderr = run_cli("bench", "--artifacts", str(tiny_artifacts), "--backend", "onnxruntime", *SIZE,
                                   "--steps", "2", "--warmup", "1", "--runs", "2", "--threads", "1", "--json", "--csv", str(out))
    assert code == 0, stderr
    return json.loads(stdout), out


def test_bench_json_fields(bench_run: tuple[dict, Path]) -> None:
    data, _ = bench_run
    assert set(data["components"]) == set(SAMPLER_COMPONENTS)
    for name, c in data["components"].items():
        assert c["runs"] == 2, name
        assert 0 < c["min"] <= c["median"] <= c["p90"] <= c["max"], name
        assert c["peak_memory_mb"] > 0
    assert data["components"]["unet"]["batch"] == 2  # one step at the CFG batch
    assert data["components"]["vae_decoder"]["batch"] == 1
    e = data["end_to_end"]
    assert e["runs"] == 2 and e["steps"] == 2 and 0 < e["median"] <= e["p90"]
    assert e["stages"]["unet"]["runs"] == 2 * 2  # two steps per run, two timed runs
    # the two places that report images per minute (the result's and the end-to-end record's) agree;
    # the formula itself is checked on hand-computed numbers in test_images_per_minute_by_hand
    assert data["images_per_minute"] is not None and e["images_per_minute"] == pytest.approx(data["images_per_minute"], rel=1e-12)
    assert data["memory"]["kind"] == "rss" and data["memory"]["peak_mb"] >= data["components"]["unet"]["peak_memory_mb"]
    assert (data["height"], data["width"], data["batch"]) == (128, 128, 1)
    m = data["machine"]
    assert m["cores"] >= 1 and m["cpu"] and "onnxruntime" in m["versions"] and len(m["load_average"]) == 3


def test_bench_csv(bench_run: tuple[dict, Path]) -> None:
    data, path = bench_run
    rows = list(csv.DictReader(path.open()))
    assert [r["stage"] for r in rows] == [*SAMPLER_COMPONENTS, "end_to_end (2 steps)"]
    unet = next(r for r in rows if r["stage"] == "unet")
    assert float(unet["median"]) == pytest.approx(data["components"]["unet"]["median"])
    assert float(rows[-1]["images_per_minute"]) == pytest.approx(data["images_per_minute"])


def test_bench_table_and_components_only(tiny_artifacts: Path) -> None:
    code, stdout, stderr = run_cli("bench", "--artifacts", str(tiny_artifacts), *SIZE, "-c", "unet", "--no-end-to-end",
                                   "--warmup", "0", "--runs", "1")
    assert code == 0, stderr
    assert "unet (one step)" in stdout and "text_encoder" not in stdout and "images per minute" not in stdout


def test_component_batches_follow_the_sampler(tiny_artifacts: Path) -> None:
    m = load_manifest(tiny_artifacts)
    sampler = Sampler(OnnxRuntimeBackend(m), PipelineAssets.from_manifest(m))
    cfg = sampler.plan(Request(prompt="x", height=128, width=128, batch=2, guidance=5.0))
    assert component_batches(cfg, sampler)["unet"] == 4 and component_batches(cfg, sampler)["vae_decoder"] == 2
    nocfg = sampler.plan(Request(prompt="x", height=128, width=128, batch=1, guidance=1.0))
    assert component_batches(nocfg, sampler)["unet"] == 1


def test_images_per_minute_by_hand(tiny_artifacts: Path) -> None:
    """A batch of 2 images every 4 s (median end-to-end run) is 30 images per minute; one every 2.5 s is 24."""
    from engines.bench import BenchResult

    m = load_manifest(tiny_artifacts)
    sampler = Sampler(OnnxRuntimeBackend(m), PipelineAssets.from_manifest(m))
    for batch, median, expected in ((2, 4.0, 30.0), (1, 2.5, 24.0)):
        plan = sampler.plan(Request(prompt="x", height=128, width=128, batch=batch, seed=0))
        r = BenchResult("onnxruntime", "", plan, BenchOptions(), 0.0, "rss", "", end_to_end={"median": median})
        assert r.images_per_minute == expected
    no_loop = BenchResult("onnxruntime", "", plan, BenchOptions(), 0.0, "rss", "")
    assert no_loop.images_per_minute is None


def test_run_bench_api_and_stats(tiny_artifacts: Path) -> None:
    m = load_manifest(tiny_artifacts)
    backend = OnnxRuntimeBackend(m, threads=1)
    r = run_bench(backend, PipelineAssets.from_manifest(m),
                  BenchOptions(height=128, width=128, warmup=0, runs=1, components=("text_encoder",), end_to_end=False))
    assert list(r.components) == ["text_encoder"] and r.end_to_end is None and r.images_per_minute is None
    s = latency_stats([1.0, 2.0, 3.0, 4.0])
    assert s["median"] == 2.5 and s["p90"] == pytest.approx(3.7) and s["runs"] == 4
    assert machine_facts()["ram_gib"] > 0


@pytest.mark.parametrize("args, message", [
    # counts are checked by Click's IntRange before any work, like every command's (issue 12 item 8)
    (["--runs", "0"], "Error: Invalid value for '--runs': 0 is not in the range x>=1.\n"),
    (["--warmup", "-1"], "Error: Invalid value for '--warmup': -1 is not in the range x>=0.\n"),
    (["-c", "vae_encoder"], "cannot bench vae_encoder"),
    (["-c", "", "--no-end-to-end"], "nothing to measure"),
    (["--backend", "tensorrt"], "--backend tensorrt needs --engines"),
    (["--engines", "x"], "--engines is for --backend tensorrt"),
])
def test_bench_bad_input(tiny_artifacts: Path, args: list[str], message: str) -> None:
    code, _, stderr = run_cli("bench", "--artifacts", str(tiny_artifacts), *args)
    assert code == 2 and message in stderr, stderr


def test_bench_tensorrt_without_engines_folder(tmp_path: Path) -> None:
    code, _, stderr = run_cli("bench", "--backend", "tensorrt", "--engines", str(tmp_path))
    assert code == 2 and "Error:" in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_bench_csv_into_folder_is_refused(tiny_artifacts: Path, tmp_path: Path) -> None:
    code, _, stderr = run_cli("bench", "--artifacts", str(tiny_artifacts), "--csv", str(tmp_path))
    assert code == 2 and "is a folder" in stderr
