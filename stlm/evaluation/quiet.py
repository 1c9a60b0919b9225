"""What lm-eval does around an evaluation that a user of ``stlm eval`` should not see or debug:
a traceback when a task's dataset cannot be had, ``fatal: not a git repository`` from its
``git describe``, and a hint about lm-eval's own ``--metadata`` flag for every local task."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import types
from collections.abc import Iterator
from typing import Any

import lm_eval.evaluator

from stlm.errors import InvalidArgumentError

#: Exceptions (by class name, anywhere in the chain) that mean "the dataset could not be fetched or found".
_UNAVAILABLE = frozenset(
    {
        "ConnectionError",
        "OfflineModeIsEnabled",
        "LocalEntryNotFoundError",
        "DatasetNotFoundError",
        "DataFilesNotFoundError",
        "FileNotFoundError",
        "HfHubHTTPError",
        "RepositoryNotFoundError",
    }
)


class _NoMetadataHint(logging.Filter):
    """Drops lm-eval's "Custom kwargs can be passed to `--metadata`" warning (a flag stlm eval lacks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def _git_hash() -> str | None:
    """lm-eval's ``git_hash`` of the working directory, without git's ``fatal:`` line on stderr."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _task_of(exc: BaseException) -> Any:
    """The lm-eval task whose ``download`` raised ``exc`` (from the traceback), else None."""
    tb: types.TracebackType | None = exc.__traceback__
    found = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "download" and hasattr(frame.f_locals.get("self"), "config"):
            found = frame.f_locals["self"]
        tb = tb.tb_next
    return found


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def dataset_error(exc: BaseException) -> InvalidArgumentError | None:
    """An ``error:`` for a task whose dataset could not be loaded (offline, not cached), else None."""
    task = _task_of(exc)
    causes = [type(e).__name__ for e in _chain(exc)]
    if task is None or not _UNAVAILABLE.intersection(causes):
        return None
    config = task.config
    dataset = config.dataset_path or "its custom_dataset"
    if config.dataset_name:
        dataset = f"{dataset} ({config.dataset_name})"
    reason = (str(exc).strip().splitlines() or [""])[0][:200]
    return InvalidArgumentError(
        f"task {config.task!r} needs the dataset {dataset!r}, which could not be loaded (offline, or not in the "
        f"datasets cache: {type(exc).__name__}: {reason})",
        fix="run it once with network access (it is then kept in HF_DATASETS_CACHE, "
        "~/.cache/huggingface/datasets by default, for offline runs), or pass --include_path FOLDER with a "
        "task YAML whose data is local (custom_dataset, or dataset_path: json with data_files)",
    )


@contextlib.contextmanager
def lm_eval_quietly() -> Iterator[None]:
    """Around ``simple_evaluate``: unavailable datasets become :class:`InvalidArgumentError`, no git
    noise, no ``--metadata`` hint."""
    hint = _NoMetadataHint()
    task_log = logging.getLogger("lm_eval.api.task")
    saved = lm_eval.evaluator.get_git_commit_hash
    task_log.addFilter(hint)
    lm_eval.evaluator.get_git_commit_hash = _git_hash
    try:
        yield
    except Exception as exc:
        error = dataset_error(exc)
        if error is None:
            raise
        raise error from None
    finally:
        lm_eval.evaluator.get_git_commit_hash = saved
        task_log.removeFilter(hint)
