"""koala-trt: KOALA (distilled SDXL) to ONNX and strongly typed TensorRT engines."""

__version__ = "0.1.0"
