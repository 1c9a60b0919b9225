"""Test support shipped with stlm: random-weight StableLM checkpoints written with numpy.

Used by ``stlm make-checkpoint``, ``stlm demo``, the tests and the benchmarks; never by the
exporter or the runtime. Needs only numpy, ml_dtypes and tokenizers (no torch).
"""

from stlm.testing.checkpoint import PRESETS, Shape, write_random_checkpoint

__all__ = ["PRESETS", "Shape", "write_random_checkpoint"]
