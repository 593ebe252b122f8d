"""koala-trt: KOALA (distilled SDXL) to ONNX and strongly typed TensorRT engines: the `koala-trt` CLI
and a Python API in diffusers' shape.

    from koala_trt import Pipeline

    pipe = Pipeline.from_artifacts("out/artifacts", backend="openvino")   # or Pipeline.from_engines("out/engines")
    image = pipe("a koala in a eucalyptus tree", num_inference_steps=25, seed=0).images[0]
    image.save("koala.png")

Pipeline (sampler/api.py): text to image with the numpy sampler over onnxruntime, openvino, tensorrt
or torch; no torch or diffusers is imported for the first three. KoalaError: every failure the user can
act on, in one line; UsageError (a KoalaError): bad input, raised before any network runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from koala_core import __version__
from koala_core.errors import KoalaError, UsageError

if TYPE_CHECKING:
    from sampler.api import Pipeline, PipelineOutput

__all__ = ["KoalaError", "Pipeline", "PipelineOutput", "UsageError", "__version__"]


def __getattr__(name: str) -> Any:
    # Pipeline is imported on first use, so `koala-trt --help` and `import koala_trt` stay light (no numpy).
    if name in ("Pipeline", "PipelineOutput"):
        from sampler import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
