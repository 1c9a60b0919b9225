"""Custom TensorRT plugins used by stlm engines (one sub-package per plugin, each with a README)."""
