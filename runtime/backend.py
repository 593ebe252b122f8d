"""One runtime interface over the backends that run a component: feeds in, outputs out, by the
names in the component specs. The sampler, validation and bench talk to this, nothing else.

Backends:
- `onnxruntime` (this module): an artifacts folder's ONNX graphs; CPU, or CUDA with onnxruntime-gpu.
- `tensorrt` (runtime/tensorrt_backend.py): engines from a `koala-trt build` folder.
- `torch` (runtime/torch_backend.py): the PyTorch reference modules from --model.
- `openvino` (runtime/openvino_backend.py): the same ONNX graphs compiled by OpenVINO for the CPU (BF16
  where the CPU has it, see --cpu-precision).
onnxruntime, openvino and tensorrt never import torch or diffusers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from exporter.manifest import Manifest, load_manifest
from exporter.specs import ComponentSpec, ShapeRange
from koala_core.errors import KoalaError, UsageError

BACKENDS = ("onnxruntime", "openvino", "tensorrt", "torch")
# The backends that run an artifacts folder's ONNX graphs (so those files are checked before they run).
ONNX_BACKENDS = ("onnxruntime", "openvino")


class Backend:
    """Base class of the runtime backends (as Polygraphy's BaseRunner is of its runners): `name`, the
    `specs` of every component it can run, `run`; the rest has shared defaults a backend overrides
    where it knows better. A backend opens its files in `load` (so a bad one fails before any run)
    or on first use, and frees them in `close`; it is also a context manager."""

    name: str = ""
    specs: dict[str, ComponentSpec]

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of `component` for `feeds` (numpy, dtypes and names as its spec declares)."""
        raise NotImplementedError(f"{type(self).__name__}.run")

    def load(self, components: list[str]) -> None:
        """Open everything `components` need now (default: nothing, opened on first use)."""

    def shape_range(self, component: str) -> ShapeRange | None:
        """The sizes it can run `component` at (an engine's profile, an artifact's export range);
        None: any size the spec's granularity allows."""
        return None

    def vae_tile(self) -> int | None:
        """The tile size (pixels) its VAE decoder was built for, where it runs tiles only (an engine
        built for a profile's [vae] tile); None: it decodes whole images."""
        return None

    def describe(self) -> str:
        """One line for logs and reports (providers, device, precision)."""
        return self.name

    def run_precision(self, component: str, artifact_precision: str) -> str:
        """The precision `component` computes at here, for its accuracy gate: the artifact's own,
        unless the backend computes lossier (openvino's BF16)."""
        return artifact_precision

    def close(self) -> None:
        """Free sessions, engines and buffers; the backend may be used again after (it reopens)."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime over an artifacts folder; sessions are created on first use (or by `load`) and kept.
    The CUDA execution provider is used where onnxruntime-gpu offers it, else the CPU one."""

    name = "onnxruntime"

    def __init__(self, artifacts: Path | str | Manifest, providers: list[str] | None = None, threads: int | None = None) -> None:
        self.manifest = artifacts if isinstance(artifacts, Manifest) else load_manifest(artifacts)
        self.specs = self.manifest.specs()
        self.providers, self.threads = providers, threads
        self._sessions: dict[str, object] = {}

    def session(self, component: str) -> object:
        if component not in self._sessions:
            from koala_core.ort import make_session

            self._sessions[component] = make_session(self.manifest.onnx_path(component), self.providers, self.threads,
                                                     precision=self.manifest.precision(component))
        return self._sessions[component]

    def load(self, components: list[str]) -> None:
        for name in components:
            self.session(name)

    def shape_range(self, component: str) -> ShapeRange | None:
        c = self.manifest.view.components.get(component)
        return c.shape_range if c is not None else None

    def describe(self) -> str:
        used = sorted({p for s in self._sessions.values() for p in s.get_providers()})  # type: ignore[attr-defined]
        return f"onnxruntime ({', '.join(used) or 'no sessions yet'})"

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component] if component in self.specs else self.manifest.spec(component)
        spec.check_inputs(feeds)
        names = [t.name for t in spec.outputs]
        outs = self.session(component).run(names, {t.name: feeds[t.name] for t in spec.inputs})  # type: ignore[attr-defined]
        return dict(zip(names, outs))

    def close(self) -> None:
        self._sessions.clear()


def log_stderr(message: str) -> None:
    """The default log of status lines (stdout stays for results and --json)."""
    import sys

    print(message, file=sys.stderr)


def open_backend(name: str, artifacts: Path | None = None, engines: Path | None = None, model: str | None = None,
                 manifest: Manifest | None = None, threads: int | None = None, cpu_precision: str | None = None,
                 torch_precision: str = "fp32", verify: bool = False) -> Any:
    """The backend `name` over its inputs: onnxruntime and openvino <- artifacts, tensorrt <- engines,
    torch <- model. openvino, tensorrt and torch are imported here, only when asked for.
    cpu_precision (auto, fp32, bf16) is for openvino; torch_precision (fp32, bf16 = autocast) for torch."""
    if cpu_precision is not None and name != "openvino":
        raise UsageError(f"--cpu-precision is for --backend openvino (not {name})")
    if name == "openvino":
        if artifacts is None and manifest is None:
            raise UsageError("--backend openvino needs --artifacts DIR")
        from runtime.openvino_backend import OpenVinoBackend

        return OpenVinoBackend(manifest or load_manifest(artifacts), threads=threads, cpu_precision=cpu_precision,  # type: ignore[arg-type]
                               verify=verify)
    if name == "onnxruntime":
        if artifacts is None and manifest is None:
            raise UsageError("--backend onnxruntime needs --artifacts DIR")
        return OnnxRuntimeBackend(manifest or load_manifest(artifacts), threads=threads)  # type: ignore[arg-type]
    if name == "tensorrt":
        if engines is None:
            raise UsageError("--backend tensorrt needs --engines DIR (a `koala-trt build` folder)")
        if not Path(engines).is_dir():
            raise UsageError(f"engines folder {engines} does not exist")
        from engines.engine_set import resolve_engines

        engines = resolve_engines(engines, log=log_stderr)  # an engine set: the folder of the card that runs here
        try:
            from runtime.tensorrt_backend import TensorRTBackend

            return TensorRTBackend(Path(engines))
        except ImportError as e:  # runtime/tensorrt_backend.py, tensorrt or cuda-python is missing
            raise KoalaError(f"the tensorrt backend is not available here ({e}); "
                             "it needs the [gpu] extra on a machine with an NVIDIA GPU") from None
    if name == "torch":
        if model is None:
            raise UsageError("--backend torch needs --model (the PyTorch reference: hub id, folder or random:<preset>)")
        from runtime.torch_backend import TorchBackend

        source: Any = model
        if manifest is not None and manifest.view.source.controlnet:  # the artifacts' ControlNet, for its pair of components
            from exporter.sources import resolve_recorded

            source = resolve_recorded(model, manifest.view.source.controlnet)
        return TorchBackend(source, specs=manifest.specs() if manifest is not None else None, precision=torch_precision)
    raise UsageError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
