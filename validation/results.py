"""What a validation run produces: checks (one component on one input set, or the end-to-end run),
each a list of measured metrics with their limits and verdicts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Measured:
    """One metric of one output: the worst value over the samples, its limit and the verdict."""

    output: str
    metric: str
    value: float | None
    limit: float
    passed: bool
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "metric": self.metric, "value": finite_or_none(self.value),
                "limit": self.limit, "passed": self.passed, "note": self.note}

    def describe(self) -> str:
        v = "n/a" if self.value is None else f"{self.value:.4g}"
        op = ">=" if self.metric.split("@")[0] in ("cosine", "psnr", "ssim") else "<="
        text = f"{self.output} {self.metric} {v} (limit {op} {self.limit:.4g})"
        return text + (f": {self.note}" if self.note else "")


@dataclass
class Check:
    """One component on one input set ("random", "prompts", "interface"), or "end_to_end"."""

    component: str
    inputs: str
    precision: str
    description: str = ""
    samples: int = 0
    shapes: dict[str, list[int]] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per output: aggregated error stats
    measured: list[Measured] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # per runner: inference seconds

    @property
    def id(self) -> str:
        return self.component if self.component == self.inputs else f"{self.component}/{self.inputs}"

    @property
    def passed(self) -> bool:
        return bool(self.measured) and all(m.passed for m in self.measured)

    def failures(self) -> list[Measured]:
        return [m for m in self.measured if not m.passed]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "component": self.component, "inputs": self.inputs, "precision": self.precision,
                "description": self.description, "samples": self.samples, "shapes": self.shapes, "limits": self.limits,
                "outputs": self.outputs, "metrics": [m.to_json() for m in self.measured], "seconds": self.seconds,
                "passed": self.passed}


def finite_or_none(v: float | None) -> float | None:
    """JSON has no NaN/Inf: non-finite values are written as null (and never pass)."""
    return v if v is not None and math.isfinite(v) else None
