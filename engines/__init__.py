"""GPU profiles, memory planner, TensorRT build, runtime backends, sampler, validation, bench."""
