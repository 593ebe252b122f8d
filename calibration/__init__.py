"""INT8 and FP16 precision variants: prompts, trajectory capture, Q/DQ quantization."""
