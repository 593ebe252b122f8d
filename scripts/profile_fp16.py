"""Where the FP16 conversion's time and memory go, per phase and component: today's path (ModelOpt
AutoCast with the weights loaded, as `convert` ran it until 7 Dec 2026) and/or the one `convert`
runs now (AutoCast on the weightless graph, weights converted on disk; calibration/autocast_on_disk.py).

    python scripts/profile_fp16.py --onnx FULL --calib CAL [--path old,new] [-c unet] [--json OUT]

Each phase's time is exclusive (a nested phase's time is its own), its peak RSS the largest resident
size sampled (every 50 ms) while it was the innermost phase running. The per-component figure is
the whole component's wall time and peak. Both paths convert from the same measured ranges (the
range pass runs once per component and is timed as its own phase). Writes nothing but a temporary
folder (and --json).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


class Phases:
    """Exclusive seconds and peak RSS per named phase (a stack of the phases running)."""

    def __init__(self) -> None:
        self.stack: list[list[Any]] = []  # [name, started, child seconds]
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            if self.stack:
                name = self.stack[-1][0]
                self.peak[name] = max(self.peak.get(name, 0.0), _rss_mb())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.stack.append([name, time.perf_counter(), 0.0])
        self.peak[name] = max(self.peak.get(name, 0.0), _rss_mb())
        try:
            yield
        finally:
            n, t0, child = self.stack.pop()
            total = time.perf_counter() - t0
            self.seconds[n] = self.seconds.get(n, 0.0) + total - child
            self.calls[n] = self.calls.get(n, 0) + 1
            self.peak[n] = max(self.peak.get(n, 0.0), _rss_mb())
            if self.stack:
                self.stack[-1][2] += total

    def wrap(self, owner: Any, attr: str, name: str) -> Callable[[], None]:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*a: Any, **k: Any) -> Any:
            with self.phase(name):
                return original(*a, **k)

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, original)

    def reset(self) -> None:
        self.seconds.clear(), self.peak.clear(), self.calls.clear()

    def table(self) -> dict[str, dict[str, float]]:
        return {n: {"seconds": round(s, 2), "peak_rss_gib": round(self.peak.get(n, 0.0) / 1024, 2), "calls": self.calls[n]}
                for n, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])}


def _instrument(ph: Phases) -> list[Callable[[], None]]:
    import onnx
    import onnx.external_data_helper as edh
    import modelopt.onnx.utils as mu
    from modelopt.onnx.autocast import convert as ac_convert
    from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer
    from modelopt.onnx.autocast.nodeclassifier import NodeClassifier
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    import calibration.autocast_on_disk as aod
    import calibration.artifacts as art

    return [
        ph.wrap(ac_convert.onnx, "load", "load graph (no weights)"),
        ph.wrap(GraphSanitizer, "sanitize", "sanitize graph"),
        ph.wrap(mu, "infer_types", "shape/type inference (AutoCast)"),
        ph.wrap(edh, "load_external_data_for_model", "load weights into the graph"),
        ph.wrap(PrecisionConverter, "__init__", "copy model (PrecisionConverter)"),
        ph.wrap(NodeClassifier, "run", "classify nodes"),
        ph.wrap(PrecisionConverter, "convert", "rewrite graph (casts, initializers, cleanup)"),
        ph.wrap(mu, "check_model", "onnx checker (AutoCast)"),
        ph.wrap(aod, "initializer_absmax", "initializer magnitudes from disk"),
        ph.wrap(aod, "with_external_weights", "inline weights moved to a data file"),
        ph.wrap(art, "save_onnx", "save"),
        ph.wrap(aod, "save_with_weights", "save"),
        ph.wrap(onnx.shape_inference, "infer_shapes_path", "shape inference of the saved graph"),
        ph.wrap(onnx.checker, "check_model", "onnx checker of the saved graph"),
    ]


def _old(path: Path, absmax: dict[str, float], keep: list[str], data_max: float, out: Path) -> Any:
    """Today's conversion: AutoCast with the weights loaded, saved whole (calibration/fp16.py before
    the weights-on-disk change)."""
    import numpy as np
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    from calibration.artifacts import save_onnx
    from calibration.fp16 import INIT_MAX, _precision_census, _range_rule

    model = convert_to_mixed_precision(str(path), low_precision_type="fp16", keep_io_types=True, data_max=np.inf,
                                       custom_rule=_range_rule(absmax, data_max), op_types_to_exclude=keep,
                                       init_max=INIT_MAX, providers=["cpu"])
    census = _precision_census(model)
    del model.graph.value_info[:]
    save_onnx(model, out)
    del model
    onnx.shape_inference.infer_shapes_path(str(out), str(out), check_type=True, strict_mode=False, data_prop=True)
    onnx.checker.check_model(str(out))
    return census


def _new(path: Path, absmax: dict[str, float], keep: list[str], data_max: float, out: Path) -> Any:
    import onnx

    from calibration.autocast_on_disk import save_with_weights, with_external_weights
    from calibration.fp16 import _precision_census, autocast

    source = with_external_weights(path, out.parent / "source")
    model = autocast(source, absmax, keep, data_max)
    census = _precision_census(model)
    del model.graph.value_info[:]
    save_with_weights(model, source.parent, out)
    del model
    onnx.shape_inference.infer_shapes_path(str(out), str(out), check_type=True, strict_mode=False, data_prop=True)
    onnx.checker.check_model(str(out))
    return census


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", type=Path, required=True)
    p.add_argument("--calib", type=Path)
    p.add_argument("-c", "--components", default="text_encoder,text_encoder_2,unet")
    p.add_argument("--path", default="old,new")
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    import onnx

    from calibration.artifacts import quiet_library
    from calibration.fp16 import Fp16Options, _range_inputs, compute_precisions, measure_ranges
    from exporter.manifest import load_manifest

    src = load_manifest(a.onnx)
    opts = Fp16Options(calib=a.calib)
    ph = Phases()
    undo = _instrument(ph)
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="koala-fp16-profile-", dir=a.onnx.parent) as tmp:
            for name in a.components.split(","):
                path = src.onnx_path(name)
                samples = _range_inputs(src, name, opts)
                ph.reset()
                t0 = time.perf_counter()
                with ph.phase("range pass (ONNX Runtime, in-graph min/max)"):
                    absmax = measure_ranges(path, samples, split_batch=src.spec(name).kind == "unet", scratch=Path(tmp))
                results[f"{name}/ranges"] = {"seconds": round(time.perf_counter() - t0, 2), "phases": ph.table(),
                                             "samples": len(samples), "tensors": len(absmax)}
                print(json.dumps({f"{name}/ranges": results[f"{name}/ranges"]}), flush=True)
                islands: dict[str, set[str]] = {}
                for which in a.path.split(","):  # new first: the old path's freed memory would stay in RSS
                    out = Path(tmp) / which / name / "model.onnx"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    ph.reset()
                    t0 = time.perf_counter()
                    with ph.phase("other"), quiet_library():
                        census = (_old if which == "old" else _new)(path, absmax, list(opts.keep_fp32_ops), opts.data_max, out)
                    secs = time.perf_counter() - t0
                    g = onnx.load(str(out), load_external_data=False)
                    islands[which] = {n for n, pr in compute_precisions(g).items() if pr == "fp32"}
                    results[f"{name}/{which}"] = {"seconds": round(secs, 2), "peak_rss_gib": round(max(ph.peak.values()) / 1024, 2),
                                                  "fp16_nodes": census["fp16_nodes"], "fp32_nodes": census["fp32_nodes"],
                                                  "phases": ph.table()}
                    print(json.dumps({f"{name}/{which}": results[f"{name}/{which}"]}), flush=True)
                    shutil.rmtree(out.parent)
                if len(islands) == 2:
                    results[f"{name}/same_fp32_nodes"] = islands["old"] == islands["new"]
                    print(f"{name}: same FP32 nodes in both paths: {islands['old'] == islands['new']}", flush=True)
    finally:
        for u in undo:
            u()
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
