"""lm-evaluation-harness on compiled packages (needs the ``eval`` extra: ``pip install 'stlm[eval]'``).

Importing this package registers the lm-eval model ``stlm``::

    import lm_eval
    import stlm.evaluation  # registers model="stlm"

    results = lm_eval.simple_evaluate(model="stlm", model_args="package=stablelm-onnx", tasks=["arc_easy"])

The adapter itself uses only :mod:`stlm.runtime` (no torch, transformers or exporter); lm-eval
imports torch for a few things when it is installed, but does not need it for the ``stlm`` model.
See docs/evaluation.md.
"""

from stlm.support.extras import require_extra

require_extra("eval", feature="stlm.evaluation (lm-evaluation-harness)")

from stlm.evaluation.lm import StlmLM  # noqa: E402 - after the extra check
from stlm.evaluation.run import (  # noqa: E402
    ItemResult,
    evaluate,
    evaluate_items,
    evaluate_package,
    item_results,
    results_table,
)

__all__ = ["ItemResult", "StlmLM", "evaluate", "evaluate_items", "evaluate_package", "item_results", "results_table"]
