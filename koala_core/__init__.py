"""Ground floor of koala-trt: errors, atomic writes, JSON files, the memory meter, ONNX Runtime sessions and
machine facts. Every other package may import it; it imports none of them."""

__version__ = "0.1.0"
