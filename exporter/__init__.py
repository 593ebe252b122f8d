"""PyTorch -> ONNX: model sources and presets, component specs, export, checks, manifest."""
