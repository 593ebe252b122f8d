"""`koala-trt validate`: the accuracy-drift gate between the PyTorch reference and an artifact
(ONNX Runtime) or engine (TensorRT), per component and end to end, with JSON/JUnit/Markdown reports
and baselines."""
