"""Run lm-evaluation-harness on a package: one call for the CLI, one for per-item comparisons.

:func:`evaluate` wraps ``lm_eval.simple_evaluate`` for any lm-eval model (``stlm`` on a package,
``hf`` on a checkpoint, ``local-completions`` against ``stlm serve``): it finds tasks (built-in and
``include_path`` folders), sets the seeds, and writes the results JSON as lm-eval's own CLI does.
:func:`item_results` turns the logged samples into per-item records (log-likelihoods, greedy flags,
generations, metrics), so two models are compared item by item with :func:`evaluate_items`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.loggers import EvaluationTracker
from lm_eval.tasks import TaskManager
from lm_eval.utils import make_table

import stlm.evaluation.lm  # noqa: F401 - registers the "stlm" model
from stlm.errors import InvalidArgumentError
from stlm.evaluation.quiet import lm_eval_quietly

log = logging.getLogger(__name__)

__all__ = ["ItemResult", "evaluate", "evaluate_items", "evaluate_package", "item_results", "results_table"]

#: lm-eval's default seeds (python random, numpy, torch, few-shot sampler), but torch's is left unset:
#: the stlm model does not use torch, and setting it would import torch (seconds). Pass it for torch models.
DEFAULT_SEEDS: tuple[int | None, int | None, int | None, int | None] = (0, 1234, None, 1234)


@dataclass(frozen=True)
class ItemResult:
    """One task item's outcome: per request (choice) the log-likelihood and greedy flag, the rolling
    log-likelihood of a whole text (``loglikelihood_rolling``: no greedy flag), or the generation
    (the raw text, before the task's filters; ``metrics`` are after them)."""

    task: str
    doc_id: int
    target: Any
    loglikelihoods: tuple[float, ...] = ()
    greedy: tuple[bool, ...] = ()
    generations: tuple[str, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)


def _task_manager(
    tasks: Sequence[str], include_path: Sequence[str | Path], include_defaults: bool | None
) -> TaskManager:
    """lm-eval's TaskManager; built-in tasks are indexed (~45 s) only when a task needs them."""
    if not tasks:
        raise InvalidArgumentError("no task given", fix="name at least one task, e.g. --tasks hellaswag")
    paths = [str(Path(p)) for p in include_path]
    for p in paths:
        if not Path(p).is_dir():
            raise InvalidArgumentError(f"include_path {p!r} is not a folder", fix="pass a folder of task YAML files")
    manager = None
    if paths and include_defaults is None:
        local = TaskManager(include_path=paths, include_defaults=False)
        manager = local if all(t in local.all_tasks for t in tasks) else None
    if manager is None:
        manager = TaskManager(include_path=paths or None, include_defaults=include_defaults is not False)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise InvalidArgumentError(
            f"unknown task(s) {missing}",
            fix="check the names (`lm-eval ls tasks`), or pass --include_path with the folder of your task YAMLs",
        )
    return manager


def _save(tracker: EvaluationTracker, results: dict[str, Any], log_samples: bool) -> None:
    """Write the results (and the samples, when logged) as lm-eval's CLI does."""
    samples: dict[str, Any] = results.get("samples") or {} if log_samples else {}
    tracker.save_results_aggregated(
        results={k: v for k, v in results.items() if k != "samples"}, samples=samples or None
    )
    for task_name, task_samples in samples.items():
        tracker.save_results_samples(task_name=task_name, samples=task_samples)


def evaluate(
    model: str,
    model_args: str | dict[str, Any],
    tasks: Sequence[str],
    *,
    include_path: Sequence[str | Path] = (),
    include_defaults: bool | None = None,
    seeds: Sequence[int | None] = DEFAULT_SEEDS,
    log_samples: bool = False,
    output_path: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` with task lookup, seeds and lm-eval's results files.

    ``include_path``: folders of task YAMLs (``include_defaults``: also lm-eval's built-in tasks;
    default: only when a task is not found in the folders). ``seeds``: python, numpy, torch and
    few-shot seeds. ``output_path``: a folder (results go to ``<folder>/<model name>/results_<time>.json``)
    or a ``.json`` file name (``<stem>_<time>.json``), as ``lm_eval --output_path``; with
    ``log_samples`` the per-item samples are written next to it. Other ``options`` (``num_fewshot``,
    ``limit``, ``batch_size``, ``device``, ``gen_kwargs``, ...) go to simple_evaluate unchanged.
    Returns simple_evaluate's results dict (with ``"samples"`` when ``log_samples``).
    """
    keep_samples = bool(options.pop("keep_samples", False))
    if len(seeds) != 4:
        raise InvalidArgumentError(f"seeds={seeds!r}: expected 4 values", fix="pass (python, numpy, torch, fewshot)")
    manager = _task_manager(tasks, include_path, include_defaults)
    tracker = EvaluationTracker(output_path=str(output_path)) if output_path else None
    with lm_eval_quietly():
        results = simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=list(tasks),
            log_samples=log_samples or keep_samples,
            evaluation_tracker=tracker,
            task_manager=manager,
            random_seed=seeds[0],
            numpy_random_seed=seeds[1],
            torch_random_seed=seeds[2],
            fewshot_random_seed=seeds[3],
            **options,
        )
    if results is None:  # only on non-zero ranks of a distributed run
        return {}
    if tracker is not None:
        _save(tracker, dict(results), log_samples)
    return dict(results)


def evaluate_package(package: str | Path, tasks: Sequence[str], **options: Any) -> dict[str, Any]:
    """:func:`evaluate` with the ``stlm`` model on ``package``; ``model_args`` adds model arguments."""
    extra = options.pop("model_args", None) or {}
    if isinstance(extra, str):
        from lm_eval.utils import simple_parse_args_string

        extra = simple_parse_args_string(extra)
    return evaluate("stlm", {"pretrained": str(package), **extra}, tasks, **options)


def item_results(results: dict[str, Any]) -> dict[str, list[ItemResult]]:
    """Per-item records of each task, ordered by doc id (needs results logged with samples)."""
    if "samples" not in results:
        raise InvalidArgumentError(
            "these results hold no samples", fix="run the evaluation with log_samples=True (or evaluate_items)"
        )
    out: dict[str, list[ItemResult]] = {}
    for task, samples in results["samples"].items():
        records = []
        for s in sorted(samples, key=lambda s: s["doc_id"]):
            raw = [r[0] for r in s["resps"]]
            pairs = all(isinstance(r, tuple | list) and len(r) == 2 for r in raw)  # loglikelihood
            rolling = all(isinstance(r, int | float) for r in raw)  # loglikelihood_rolling
            records.append(
                ItemResult(
                    task=task,
                    doc_id=int(s["doc_id"]),
                    target=s["target"],
                    loglikelihoods=tuple(float(r[0]) for r in raw)
                    if pairs
                    else tuple(map(float, raw))
                    if rolling
                    else (),
                    greedy=tuple(bool(r[1]) for r in raw) if pairs else (),
                    generations=() if pairs or rolling else tuple(str(r) for r in raw),
                    metrics={m: s[m] for m in s.get("metrics", ()) if m in s},
                )
            )
        out[task] = records
    return out


def evaluate_items(
    model: str, model_args: str | dict[str, Any], tasks: Sequence[str], **options: Any
) -> tuple[dict[str, Any], dict[str, list[ItemResult]]]:
    """Run :func:`evaluate` with samples and return ``(results, item_results(results))``.

    The same call with ``model="stlm"`` (``model_args={"package": PKG}``), ``model="hf"``
    (``{"pretrained": CHECKPOINT, "dtype": "float32"}``) or ``model="local-completions"`` (a served
    package) gives records that compare item by item.
    """
    options.setdefault("bootstrap_iters", 0)
    results = evaluate(model, model_args, tasks, keep_samples=True, **options)
    return results, item_results(results)


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's markdown table of the results (and of the groups, when there are any)."""
    table = make_table(results)
    return table + ("\n" + make_table(results, "groups") if results.get("groups") else "")


def parse_seeds(text: str) -> tuple[int | None, int | None, int | None, int | None]:
    """lm-eval's ``--seed``: one int for all four seeds, or four comma-separated ints / ``None``."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [None if p.lower() == "none" else int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1 and values[0] is not None:
        values *= 4
    if len(values) != 4:
        raise InvalidArgumentError(
            f"--seed {text!r} is invalid: expected one int or four comma-separated ints/None",
            fix="pass e.g. --seed 42 or --seed 0,1234,None,1234 (python, numpy, torch, few-shot)",
        )
    return values[0], values[1], values[2], values[3]
