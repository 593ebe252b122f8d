"""koala-trt: KOALA (distilled SDXL) to ONNX and strongly typed TensorRT engines. The Click CLI only."""

from koala_core import __version__

__all__ = ["__version__"]
