"""Model quality of a package: perplexity over a text and KL divergence from a base model.

Runtime-side: imports neither the exporter nor torch/transformers (except :mod:`stlm.quality.reference`,
used only for ``--reference``). :func:`run_perplexity` is the one stage ``stlm perplexity`` calls;
the numbers are the pure functions of :mod:`stlm.quality.stats`.
"""

from stlm.quality.perplexity import run_perplexity
from stlm.quality.report import PerplexityReport

__all__ = ["PerplexityReport", "run_perplexity"]
