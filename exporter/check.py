"""Run an exported graph in ONNX Runtime and compare it with the PyTorch module it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.metrics import ErrorStats, Tolerance, error_stats
from exporter.specs import ComponentSpec
from koala_core.ort import make_session

# FP32 ONNX Runtime against FP32 PyTorch: differences come from kernel order only (measured: rel L2
# <= 5.1e-6 and max abs <= 1.3e-5 for every random:koala-700m component, about 1e-6 for random:tiny).
# 20x above that, and tight enough that an FP16 graph (unit roundoff 4.9e-4) fails it, which
# `koala-trt validate` needs of its FP32 gate.
FP32_TOLERANCE = Tolerance(rel_l2=1e-4, max_abs_rel=1e-3)
# Measured exceptions. The VAE decoder's mid-block self-attention reduces over every latent position
# (16,384 at 1024 px), where ONNX Runtime and PyTorch differ by rel L2 1.5e-4 to 1.7e-4 on
# random:koala-700m (docs/bench-validate.md; 5e-6 at 256 px): it keeps the former 1e-3.
FP32_COMPONENT_TOLERANCES: dict[str, Tolerance] = {
    "vae_decoder": Tolerance(rel_l2=1e-3, max_abs_rel=1e-3),
}


def fp32_tolerance(component: str) -> Tolerance:
    """The FP32 ONNX Runtime vs PyTorch gate for one component (export check and `validate`)."""
    return FP32_COMPONENT_TOLERANCES.get(component, FP32_TOLERANCE)


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
            feeds: dict[str, np.ndarray], tolerance: Tolerance = FP32_TOLERANCE) -> CheckResult:
    stats = {n: error_stats(reference[n], candidate[n].astype(np.float32)) for n in reference}
    failures = {n: bad for n, s in stats.items() if (bad := tolerance.check(s))}
    return CheckResult(spec.name, {k: list(v.shape) for k, v in feeds.items()}, stats, tolerance, failures)
