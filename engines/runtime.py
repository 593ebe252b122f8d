"""One runtime interface over the backends that run a component: feeds in, outputs out, by the
names in the component specs. The sampler, validation and bench talk to this, nothing else.

Backends:
- `onnxruntime` (this module): an artifacts folder's ONNX graphs; CPU, or CUDA with onnxruntime-gpu.
- `tensorrt` (engines/runtime_trt.py): engines from a `koala-trt build` folder.
- `torch` (engines/runtime_torch.py): the PyTorch reference modules from --model.
onnxruntime and tensorrt never import torch or diffusers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from exporter.manifest import Manifest, load_manifest
from exporter.specs import ComponentSpec


class Backend(Protocol):
    """Runs pipeline components. `specs` holds the spec of every component it can run."""

    name: str
    specs: dict[str, ComponentSpec]

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of `component` for `feeds` (numpy, dtypes and names as its spec declares)."""
        ...

    def close(self) -> None:
        ...


class OnnxRuntimeBackend:
    """ONNX Runtime over an artifacts folder; sessions are created on first use and kept."""

    name = "onnxruntime"

    def __init__(self, artifacts: Path | str | Manifest, providers: list[str] | None = None, threads: int | None = None) -> None:
        self.manifest = artifacts if isinstance(artifacts, Manifest) else load_manifest(artifacts)
        self.specs = self.manifest.specs()
        self.providers, self.threads = providers, threads
        self._sessions: dict[str, object] = {}

    def session(self, component: str) -> object:
        if component not in self._sessions:
            from koala_trt.ort import make_session

            self._sessions[component] = make_session(self.manifest.onnx_path(component), self.providers, self.threads)
        return self._sessions[component]

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component] if component in self.specs else self.manifest.spec(component)
        spec.check_inputs(feeds)
        names = [t.name for t in spec.outputs]
        outs = self.session(component).run(names, {t.name: feeds[t.name] for t in spec.inputs})  # type: ignore[attr-defined]
        return dict(zip(names, outs))

    def close(self) -> None:
        self._sessions.clear()
