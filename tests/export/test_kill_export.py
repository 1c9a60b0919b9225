"""kill -9 during `stlm export --overwrite` (issue #11): at every instant OUT is the old complete
package or the new complete one, and the next export cleans what the killed one left. Two exports
racing to one new OUT: one succeeds, the other is refused."""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TIMEOUT = 120


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _export(checkpoint: Path, out: Path, kv_cache: str) -> list[str]:
    return [sys.executable, "-m", "stlm", "-q", "export", str(checkpoint), "-o", str(out), "--kv-cache", kv_cache]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _start_and_wait_for_staging(args: list[str], out: Path) -> tuple[subprocess.Popen[bytes], float]:
    """Start an export; return it once its ``.OUT.partial-PID`` folder exists (or it has ended)."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    partial = out.with_name(f".{out.name}.partial-{proc.pid}")
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc, time.monotonic()


def test_kill_9_during_an_overwrite_leaves_old_or_new(tmp_path: Path, checkpoint: Path) -> None:
    out, ref = tmp_path / "pkg", tmp_path / "ref"
    assert _run(_export(checkpoint, out, "concat")).returncode == 0
    proc, staged = _start_and_wait_for_staging(_export(checkpoint, ref, "inplace"), ref)
    assert proc.wait(timeout=TIMEOUT) == 0
    writing = time.monotonic() - staged  # from the staging folder's creation to the end
    old, new = _tree(out), _tree(ref)
    assert old != new
    rng = random.Random(11)
    for fraction in (rng.uniform(0.0, 0.5), rng.uniform(0.5, 0.9), rng.uniform(0.9, 1.0)):
        proc, _ = _start_and_wait_for_staging([*_export(checkpoint, out, "inplace"), "--overwrite"], out)
        time.sleep(writing * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        assert _tree(out) in (old, new), f"OUT is neither old nor new after a kill at {fraction:.2f}"
        if _tree(out) == new:  # the kill came late: go back to the old package for the next round
            assert _run([*_export(checkpoint, out, "concat"), "--overwrite"]).returncode == 0
            assert _tree(out) == old
    done = _run([*_export(checkpoint, out, "inplace"), "--overwrite"])
    assert done.returncode == 0, done.stderr
    assert _tree(out) == new
    assert _siblings(out) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_exports_to_one_new_folder(tmp_path: Path, checkpoint: Path, overwrite: bool) -> None:
    out = tmp_path / "pkg"
    flag = ["--overwrite"] if overwrite else []
    procs = [
        subprocess.Popen(
            [*_export(checkpoint, out, kv), *flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for kv in ("concat", "inplace")
    ]
    results = [(p.wait(timeout=TIMEOUT), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    if overwrite and codes == [0, 0]:  # the second started after the first had finished: it replaced it
        return
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "error: " in refused and "Traceback" not in refused
    assert "another stlm process is writing" in refused or "not empty" in refused
    assert _siblings(out) == []
