"""The `torch` backend: the PyTorch reference modules of --model, run through the same spec-shaped
wrappers that were exported (exporter/wrappers.py), numpy in and out like every other backend.

Only this backend imports torch; the sampler cannot tell it from onnxruntime or tensorrt.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from exporter.specs import ComponentSpec, ShapeRange
from runtime.backend import Backend


class TorchBackend(Backend):
    """Runs components with PyTorch (float32, CPU by default, CUDA with device="cuda"). Modules are
    built on first use (a pipeline module such as the VAE is built once for all its components).
    precision "bf16" runs each call under torch.autocast(bfloat16) (weights stay float32; `bench
    --backend torch:bf16`); outputs are float32 either way."""

    name = "torch"

    def __init__(self, model: Any, specs: dict[str, ComponentSpec] | None = None, device: str = "cpu",
                 precision: str = "fp32") -> None:
        from exporter.sources import ModelSource, resolve
        from exporter.specs import specs_from_configs

        self.source: ModelSource = model if isinstance(model, ModelSource) else resolve(str(model))
        self.specs = dict(specs) if specs is not None else specs_from_configs(self.source.configs)
        self.device = device
        self.precision = precision
        self._modules: dict[str, Any] = {}
        self._wrapped: dict[str, Any] = {}

    def _wrapper(self, component: str) -> Any:
        if component not in self._wrapped:
            from exporter.wrappers import wrap

            spec = self.specs[component]
            if spec.module not in self._modules:
                self._modules[spec.module] = self.source.build(spec.module, device=self.device)
            self._wrapped[component] = wrap(spec, self._modules[spec.module])
        return self._wrapped[component]

    def set_cache_branch(self, branch: int) -> None:
        """Feature caching's pair (unet_deep, unet_shallow) split at `branch`: the reference needs no
        export, so it splits wherever a request asks (exporter/cache_branch.py)."""
        from exporter.specs import CACHE_COMPONENTS, UNetSpec

        if self.specs.get("unet_deep") is not None and self.specs["unet_deep"].extra.get("cache_branch") == branch:
            return
        self.specs.update(UNetSpec.cache_variants(self.specs["unet"], self.source.configs["unet"], branch))  # type: ignore[arg-type]
        for c in CACHE_COMPONENTS:
            self._wrapped.pop(c, None)

    def load(self, components: list[str]) -> None:
        for name in components:
            self._wrapper(name)

    def shape_range(self, component: str) -> ShapeRange | None:
        return None  # PyTorch runs any size the spec's granularity allows

    def describe(self) -> str:
        import torch

        autocast = ", bf16 autocast" if self.precision == "bf16" else ""
        return f"torch {torch.__version__} ({self.device}{autocast}, {self.source.ref})"

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        spec = self.specs[component]
        spec.check_inputs(feeds)
        module = self._wrapper(component)
        args = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(self.device) for t in spec.inputs]
        device_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {t.name: o.detach().to("cpu", torch.float32).numpy() for t, o in zip(spec.outputs, outs)}

    def close(self) -> None:
        self._wrapped.clear()
        self._modules.clear()
