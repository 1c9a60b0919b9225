"""Checkpoint → ONNX package → TensorRT engine. Needs the ``export`` extra (onnx)."""

from stlm.support.extras import require_extra

require_extra("export", feature="writing packages (stlm.export: `stlm export`, `stlm demo`)")
