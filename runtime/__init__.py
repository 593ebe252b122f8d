"""What runs one component: the Backend base class (backend.py) and its ONNX Runtime, OpenVINO, TensorRT and
torch backends, by the names in the component specs."""
