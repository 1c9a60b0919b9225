"""stlm: export StableLM-3B-4E1T to ONNX / TensorRT and run it.

The light runtime lives in :mod:`stlm.runtime` (no torch, no transformers).
"""

__version__ = "0.1.0"

from stlm.errors import StlmError

__all__ = ["StlmError", "__version__"]
