"""Atomic, exclusive output folders: every stlm writer (export, build-engine, make-checkpoint) goes
through :func:`staged_folder`, so at every instant ``OUT`` is either absent, the old complete folder
or the new complete one.

* **What may be replaced.** An existing non-empty ``OUT`` is replaced only with ``overwrite`` and
  only when stlm made it (:func:`owned_files` recognises it) and it holds nothing else; never a
  folder the run reads (the checkpoint, the ONNX package), an ancestor of one, the current folder
  or an ancestor of it.
* **The swap.** The new folder is built as ``.OUT.partial-PID`` (files fsynced); ``OUT`` is checked
  again, then exchanged with it in one atomic ``renameat2(RENAME_EXCHANGE)`` and the old one
  deleted. Where the kernel cannot exchange, ``OUT`` is renamed to ``.OUT.old-PID`` and the new
  folder to ``OUT``.
* **The lock.** ``.OUT.lock`` (``flock``) is held for the whole write: a second writer to the same
  ``OUT`` is refused. Under the lock every ``.OUT.partial-*`` / ``.OUT.old-*`` sibling is a
  leftover of a killed writer: partials are deleted, and an ``.old`` is put back when ``OUT`` is
  missing (the kill fell between the two renames), else deleted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Final

from stlm.errors import InvalidArgumentError, StlmError

log = logging.getLogger(__name__)

#: the file ``stlm make-checkpoint`` leaves in a checkpoint it wrote (lists the files it wrote)
CHECKPOINT_MARKER: Final = ".stlm-checkpoint"
_MANIFEST: Final = "stlm.json"
_MANIFEST_FILE_KEYS: Final = ("graph", "tokenizer", "chat_template", "tokenizer_config")
#: files a package may hold besides those its manifest names (external weights, engine, timing cache)
_PACKAGE_EXTRAS: Final = ("model.onnx.data", "model.engine", "model.plan", "timing.cache")

Owner = Callable[[Path], "set[str] | None"]


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def package_files(folder: Path) -> set[str] | None:
    """The files of the stlm package ``folder`` (None: ``folder`` is not an stlm package)."""
    data = _load_json(folder / _MANIFEST)
    if not isinstance(data, dict) or data.get("format") != "stlm-package":
        return None
    named = {data.get(key) for key in _MANIFEST_FILE_KEYS}
    graph = data.get("graph")
    extras = {f"{graph}.data"} if isinstance(graph, str) else set()
    return {n for n in named | extras if isinstance(n, str)} | {_MANIFEST, *_PACKAGE_EXTRAS}


def checkpoint_files(folder: Path) -> set[str] | None:
    """The files of a checkpoint ``stlm make-checkpoint`` wrote (None: not one)."""
    data = _load_json(folder / CHECKPOINT_MARKER)
    if not isinstance(data, dict) or data.get("format") != "stlm-checkpoint":
        return None
    files = data.get("files")
    if not isinstance(files, list):
        return None
    return {f for f in files if isinstance(f, str)} | {CHECKPOINT_MARKER}


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_place(out: Path, protect: Sequence[Path]) -> None:
    """``OUT`` must be a folder path whose first existing ancestor is a folder, and not hold an input."""
    real = out.resolve()
    here = _first_existing(out)
    if here != out and not here.is_dir():
        raise InvalidArgumentError(
            f"cannot create {str(out)!r}: {str(here)!r} is a file, not a folder", fix="pass an -o path inside a folder"
        )
    if out.is_symlink():
        raise InvalidArgumentError(
            f"output {str(out)!r} is a symbolic link; stlm replaces only real folders",
            fix=f"pass the folder it points to ({out.resolve()}) or another -o folder",
        )
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"output {str(out)!r} is a file, not a folder", fix="pass another -o folder")
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current folder was deleted: nothing to protect there
        cwd = None
    if cwd is not None and _within(cwd, real):
        raise InvalidArgumentError(
            f"output folder {str(out)!r} is the current folder or one of its parents",
            fix="pass a new folder, e.g. -o ./package",
        )
    for source in protect:
        if _within(Path(source).resolve(), real):
            raise InvalidArgumentError(
                f"output folder {str(out)!r} is or contains the input {str(source)!r}, which stlm never replaces",
                fix="pass another -o folder",
            )


def check_output(out: Path, *, overwrite: bool, owner: Owner = package_files, protect: Sequence[Path] = ()) -> None:
    """Refuse (:class:`InvalidArgumentError`) an ``out`` that writing would damage; see the module docstring."""
    out = Path(out)
    _check_place(out, protect)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise InvalidArgumentError(
            f"output folder {str(out)!r} already exists and is not empty",
            fix="pass another -o folder, or --overwrite to replace it (only a folder stlm wrote is replaced)",
        )
    files = owner(out)
    if files is None:
        raise InvalidArgumentError(
            f"output folder {str(out)!r} was not written by stlm, so --overwrite does not replace it",
            fix="pass another -o folder, or move the folder away yourself",
        )
    foreign = sorted(p.name for p in out.iterdir() if p.name not in files or not p.is_file() or p.is_symlink())
    if foreign:
        raise InvalidArgumentError(
            f"output folder {str(out)!r} holds files stlm did not write ({', '.join(foreign[:5])}), "
            "so --overwrite does not replace it",
            fix="move those files away, or pass another -o folder",
        )


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what killed writers of ``out`` left (call with the lock held); return what was removed."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)$")
    found = sorted((m.group(1), p) for p in out.parent.iterdir() if (m := pattern.match(p.name)))
    removed = []
    for kind, path in found:
        if kind == "old" and not out.exists():
            log.warning("restoring %s from %s (a replacement was interrupted)", out, path)
            os.replace(path, out)
            continue
        log.info("removing %s, left by an interrupted write", path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    path = out.with_name(f".{out.name}.lock")
    for _ in range(8):
        handle: IO[bytes] = path.open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StlmError(
                f"another stlm process is writing {str(out)!r} (it holds {path.name})",
                fix="wait for it to finish, or pass another -o folder",
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the previous holder removed the file after we opened it: take the new one
    else:
        raise StlmError(f"could not lock {path}", fix="retry")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def _fsync_tree(folder: Path, *, recurse: bool = True) -> None:
    for path in [*(folder.rglob("*") if recurse else ()), folder]:
        if path.is_symlink():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EBADF):
                raise
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the C library or the file system cannot (the caller then renames twice)."""
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the complete ``tmp``. Where the kernel can, the two are exchanged atomically
    (``OUT`` is complete at every instant; the old folder, now at ``tmp``, is deleted by the caller);
    else ``out`` is renamed aside first, so at every instant ``out`` or ``.out.old-PID`` is complete
    (:func:`clean_leftovers` puts an ``.old`` back)."""
    _fsync_tree(tmp)
    if out.exists() and not _exchange(tmp, out):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    elif not out.exists():
        os.replace(tmp, out)
    _fsync_tree(out.parent, recurse=False)


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of the file ``path`` to write; when the block succeeds it replaces
    ``path`` atomically (fsynced), and it never remains otherwise. The caller checks first that
    ``path`` is new or a file stlm wrote."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_error(out: Path, exc: OSError) -> StlmError:
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return StlmError(
        f"could not write {str(out)!r}: {reason}{where}",
        fix="free disk space, or pass an -o folder you can write to",
    )


@contextmanager
def staged_folder(
    out: Path, *, overwrite: bool = False, owner: Owner = package_files, protect: Sequence[Path] = ()
) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out``, locked against other writers. When the block
    succeeds it replaces ``out`` atomically; when it fails (or is killed) nothing of it remains at
    ``out``. ``out`` is checked by :func:`check_output` first (under the lock)."""
    out = Path(out).absolute()
    check_output(out, overwrite=overwrite, owner=owner, protect=protect)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(out, exc) from None
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        with _lock(out):
            clean_leftovers(out)
            check_output(out, overwrite=overwrite, owner=owner, protect=protect)
            try:
                tmp.mkdir()
                yield tmp
                check_output(out, overwrite=overwrite, owner=owner, protect=protect)  # changed meanwhile?
                _publish(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise _write_error(out, exc) from None
