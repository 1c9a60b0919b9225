"""Never destroy what is not ours (issue #11): --overwrite replaces only a folder stlm wrote, never
the input, an ancestor of it, the current folder or foreign content; writes are atomic and locked;
what killed writers leave behind is cleaned by the next one."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from test_errors import assert_user_error, run_cli

from stlm.errors import StlmError
from stlm.support.staging import clean_leftovers, staged_folder


def tree_hash(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path → sha256), symlinks as their target."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[rel] = "dir"
    return found


@pytest.fixture
def workspace(tmp_path: Path, checkpoint: Path) -> Path:
    """tmp/ holding a copy of the tiny checkpoint (ckpt/) and an unrelated folder (mine/)."""
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own work\n")
    return tmp_path


def _export(*args: str) -> list[str]:
    return ["export", *args, "--overwrite"]


def test_overwrite_never_replaces_the_checkpoint_or_its_parent(workspace: Path) -> None:
    before = tree_hash(workspace)
    ckpt = str(workspace / "ckpt")
    assert_user_error(_export(ckpt, "-o", ckpt), "is or contains the input", "fix:")
    assert_user_error(_export(ckpt, "-o", str(workspace)), "is or contains the input")
    assert_user_error(_export(ckpt, "-o", str(workspace / "mine")), "not written by stlm")
    assert tree_hash(workspace) == before


def test_overwrite_never_replaces_the_current_folder(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: Path
) -> None:
    before = tree_hash(workspace)
    monkeypatch.chdir(workspace / "mine")
    assert_user_error(_export(str(checkpoint), "-o", "."), "current folder")
    assert_user_error(_export(str(checkpoint), "-o", ".."), "current folder")
    assert tree_hash(workspace) == before


def test_overwrite_refuses_a_package_with_foreign_files(workspace: Path, package: Path) -> None:
    out = workspace / "pkg"
    shutil.copytree(package, out)
    (out / "results.csv").write_text("keep me\n")
    before = tree_hash(workspace)
    assert_user_error(_export(str(workspace / "ckpt"), "-o", str(out)), "results.csv", "fix:")
    assert tree_hash(workspace) == before


def test_output_below_a_file_or_a_file(workspace: Path) -> None:
    before = tree_hash(workspace)
    note = workspace / "mine" / "notes.txt"
    assert_user_error(["export", str(workspace / "ckpt"), "-o", str(note / "pkg")], "is a file")
    assert_user_error(["export", str(workspace / "ckpt"), "-o", str(note), "--overwrite"], "is a file")
    assert tree_hash(workspace) == before


def test_overwrite_replaces_an_stlm_package(workspace: Path) -> None:
    out = workspace / "pkg"
    code, _ = run_cli("export", str(workspace / "ckpt"), "-o", str(out))
    assert code == 0
    first = tree_hash(out)
    code, _ = run_cli("export", str(workspace / "ckpt"), "-o", str(out), "--overwrite", "--kv-cache", "concat")
    assert code == 0 and tree_hash(out) != first
    assert sorted(p.name for p in workspace.iterdir()) == ["ckpt", "mine", "pkg"]  # no .partial/.old/.lock left


def test_make_checkpoint_refuses_an_existing_checkpoint(workspace: Path) -> None:
    before = tree_hash(workspace)
    ckpt = str(workspace / "ckpt")  # written by the conftest fixture, i.e. by stlm: still not without --overwrite
    assert_user_error(["make-checkpoint", ckpt, "--preset", "tiny"], "not empty", "--overwrite")
    assert_user_error(["make-checkpoint", str(workspace / "mine"), "--overwrite"], "not written by stlm")
    assert tree_hash(workspace) == before


def test_make_checkpoint_overwrites_its_own(tmp_path: Path) -> None:
    tokenizer = tmp_path / "tok" / "tokenizer.json"
    tokenizer.parent.mkdir()
    from conftest import neox_tokenizer

    shutil.copyfile(neox_tokenizer(), tokenizer)
    out = tmp_path / "ck"
    args = ["make-checkpoint", str(out), "--preset", "tiny", "--tokenizer", str(tokenizer)]
    assert run_cli(*args)[0] == 0
    first = tree_hash(out)
    assert run_cli(*args, "--seed", "1", "--overwrite")[0] == 0
    assert tree_hash(out).keys() == first.keys() and tree_hash(out) != first
    (out / "mine.txt").write_text("x")
    assert_user_error([*args, "--overwrite"], "mine.txt")
    # a checkpoint's tokenizer folder is an input: never replaced
    assert_user_error(["make-checkpoint", str(tokenizer.parent), "--tokenizer", str(tokenizer), "--overwrite"])
    assert tokenizer.is_file()


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    with staged_folder(out) as tmp:
        (tmp / "stlm.json").write_text(json.dumps({"format": "stlm-package"}))
        with pytest.raises(StlmError, match="another stlm process is writing"), staged_folder(out):
            pass
    assert (out / "stlm.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_a_failed_write_leaves_the_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    with staged_folder(out) as tmp:
        (tmp / "stlm.json").write_text(json.dumps({"format": "stlm-package"}))
    before = tree_hash(out)
    with pytest.raises(RuntimeError), staged_folder(out, overwrite=True) as tmp:
        (tmp / "stlm.json").write_text("{}")
        raise RuntimeError("boom")
    assert tree_hash(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_swaps_in_the_new_folder_and_leaves_nothing_else(
    tmp_path: Path, exchange: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An atomic exchange (renameat2) where the kernel has one, two renames where it has not."""
    import stlm.support.staging

    if not exchange:
        monkeypatch.setattr(stlm.support.staging, "_exchange", lambda a, b: False)
    out = tmp_path / "pkg"
    for version in ("old", "new"):
        with staged_folder(out, overwrite=True) as tmp:
            (tmp / "stlm.json").write_text(json.dumps({"format": "stlm-package", "graph": version}))
    assert json.loads((out / "stlm.json").read_text())["graph"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


@pytest.mark.parametrize("out_present", [True, False])
def test_leftovers_of_a_killed_swap_are_cleaned(tmp_path: Path, out_present: bool) -> None:
    """A kill between the two renames (OUT missing, .OUT.old complete) or after them (.old stale)."""
    out = tmp_path / "pkg"
    with staged_folder(out) as tmp:
        (tmp / "stlm.json").write_text(json.dumps({"format": "stlm-package", "graph": "a"}))
    old = tree_hash(out)
    dead = 2**22 + 12345  # above pid_max's default: no such process
    (tmp_path / f".pkg.partial-{dead}").mkdir()
    (tmp_path / f".pkg.partial-{dead}" / "model.onnx").write_bytes(b"half")
    if out_present:
        shutil.copytree(out, tmp_path / f".pkg.old-{dead}")
    else:
        os.replace(out, tmp_path / f".pkg.old-{dead}")
    clean_leftovers(out)
    assert tree_hash(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_a_symlinked_output_is_refused(workspace: Path, package: Path) -> None:
    real = workspace / "real"
    shutil.copytree(package, real)
    (workspace / "link").symlink_to(real)
    before = tree_hash(workspace)
    assert_user_error(_export(str(workspace / "ckpt"), "-o", str(workspace / "link")), "symbolic link")
    assert tree_hash(workspace) == before


def test_a_full_disk_is_an_stlm_error(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    with pytest.raises(StlmError, match="No space left on device") as info, staged_folder(out) as tmp:
        (tmp / "stlm.json").write_text("{}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "model.onnx"))
    assert "fix:" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_build_engine_never_replaces_its_onnx_package(workspace: Path, package: Path) -> None:
    pkg = workspace / "pkg"
    shutil.copytree(package, pkg)
    before = tree_hash(workspace)
    assert_user_error(["build-engine", str(pkg), "-o", str(pkg), "--overwrite"], "is or contains the input")
    assert_user_error(["build-engine", str(pkg), "-o", str(workspace), "--overwrite"], "is or contains the input")
    assert_user_error(["build-engine", str(pkg), "-o", str(workspace / "mine"), "--overwrite"], "not written by stlm")
    assert tree_hash(workspace) == before
