"""Run an exported graph in ONNX Runtime and compare it with the PyTorch module it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.metrics import ErrorStats, Tolerance, error_stats
from exporter.specs import ComponentSpec
from exporter.tolerances import tolerance
from koala_core.ort import make_session


# The table's FP32 row without the per-component exceptions (the default of `compare`).
FP32_TOLERANCE = tolerance("", "fp32")


def fp32_tolerance(component: str) -> Tolerance:
    """The FP32 ONNX Runtime vs PyTorch gate for one component (export check and `validate`), from
    the one table in exporter.tolerances."""
    return tolerance(component, "fp32")


@dataclass
class CheckResult:
    component: str
    shape: dict[str, list[int]]
    outputs: dict[str, ErrorStats]
    tolerance: Tolerance
    failures: dict[str, list[str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "inputs": self.shape,
                "tolerance": {"rel_l2": self.tolerance.rel_l2, "max_abs_rel": self.tolerance.max_abs_rel},
                "outputs": {k: v.to_json() for k, v in self.outputs.items()}, "failures": self.failures}

    def summary(self) -> str:
        worst = max(self.outputs.items(), key=lambda kv: kv[1].rel_l2)
        return f"worst output {worst[0]}: rel L2 {worst[1].rel_l2:.2e}, max abs {worst[1].max_abs:.2e}"

    def failure_message(self) -> str:
        return "; ".join(f"{self.component}.{out}: {', '.join(why)}" for out, why in self.failures.items())


def torch_outputs(spec: ComponentSpec, wrapper: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = wrapper(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
    out = out if isinstance(out, tuple) else (out,)
    return {t.name: o.detach().float().numpy() for t, o in zip(spec.outputs, out)}


def onnx_outputs(spec: ComponentSpec, path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = make_session(path, providers=["CPUExecutionProvider"])
    names = [t.name for t in spec.outputs]
    return dict(zip(names, session.run(names, {t.name: feeds[t.name] for t in spec.inputs})))


def compare(spec: ComponentSpec, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            feeds: dict[str, np.ndarray], tol: Tolerance = FP32_TOLERANCE) -> CheckResult:
    stats = {n: error_stats(reference[n], candidate[n].astype(np.float32)) for n in reference}
    failures = {n: bad for n, s in stats.items() if (bad := tol.check(s))}
    return CheckResult(spec.name, {k: list(v.shape) for k, v in feeds.items()}, stats, tol, failures)
