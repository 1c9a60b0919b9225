"""Checkpoint → ONNX package → TensorRT engine. Needs the ``export`` extra (onnx, safetensors)."""
