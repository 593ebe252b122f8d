"""What is built for a card: GPU profiles, memory planner and its choice of aids, TensorRT build (trt.py: the
only TensorRT import), refit, the engines manifest and the one compatibility rule (compat.py)."""
