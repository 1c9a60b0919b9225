"""The CLI under hostile input, round two (issue #27, items 6, 7, 9, 10 and the notes): unbounded
reads, NaN/Inf weights and logits, write errors, SIGTERM during export. Every refusal is
``error:`` on stderr's first line, exit status 2, no traceback anywhere."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stlm.testing import write_random_checkpoint
from stlm.verify import _prompt_result
from tests.test_hostile_packages import TIMEOUT, assert_refused, copy_package, stlm

TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 80
#: Peak RSS allowed (KiB) for a refused 10 MB prompt: loading the package costs about 200 MB; the
#: unbounded read peaked at 1.5 GB.
RSS_LIMIT_KIB = 700 * 1024


def peak_rss_kib(args: list[str], stdin_bytes: int) -> tuple[int, int, str]:
    """Run ``python -m stlm ARGS`` under a fresh parent with ``stdin_bytes`` bytes of 'a' on stdin;
    return (exit status, the child's peak RSS in KiB, its stderr)."""
    probe = (
        "import resource, subprocess, sys, json\n"
        f"r = subprocess.run([sys.executable, '-m', 'stlm', *{args!r}], input=b'a' * {stdin_bytes}, "
        "capture_output=True)\n"
        "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
        "r.stderr.decode(errors='replace')]))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=TIMEOUT, check=True)
    code, rss, err = json.loads(done.stdout)
    return int(code), int(rss), str(err)


def test_a_10mb_prompt_on_stdin_is_refused_before_it_is_read(random_package: Path) -> None:
    code, rss, err = peak_rss_kib(["generate", str(random_package), "--prompt", "-", "-n", "1"], 10 << 20)
    assert code == 2 and err.startswith("error:") and "Traceback" not in err, err
    assert "context" in err, err
    assert rss < RSS_LIMIT_KIB, f"peak RSS {rss >> 10} MiB"


def test_a_prompt_within_the_bound_still_runs(random_package: Path) -> None:
    done = stlm("generate", str(random_package), "--prompt", "-", "-n", "2", "-t", "0", stdin=b"Once upon a time")
    assert done.returncode == 0, done.stderr.decode()


def test_perplexity_of_dev_zero_is_refused_without_reading_it_all(random_package: Path) -> None:
    began = time.monotonic()
    assert_refused(stlm("perplexity", str(random_package), "/dev/zero"), "MiB", "--chunks")
    assert time.monotonic() - began < TIMEOUT


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_generate_to_a_full_disk_is_an_error(random_package: Path, stream: list[str]) -> None:
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [sys.executable, "-m", "stlm", "generate", str(random_package), "-p", "hi", "-n", "3", *stream],
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=TIMEOUT,
            check=False,
        )
    err = done.stderr.decode()
    assert done.returncode == 2 and err.startswith("error:") and "Traceback" not in err, err
    assert "stdout" in err


def test_save_logits_onto_an_unwritable_place_is_refused_before_the_work(random_package: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    target = "/proc/stlm-logits.npz"  # /proc takes no new files, not even from root
    err = assert_refused(
        stlm("perplexity", str(random_package), str(text), "--ctx", "16", "--save-logits", target), target
    )
    assert "chunks" not in err  # refused before any chunk ran


def test_too_short_a_text_names_the_real_ctx_bound(random_package: Path, tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("a")
    err = assert_refused(stlm("perplexity", str(random_package), str(text)), "at least 4")
    assert "≤ 0" not in err and "≤ 1" not in err


def _nan_package(package: Path, tmp_path: Path) -> Path:
    import onnx
    from onnx import numpy_helper

    pkg = copy_package(package, tmp_path)
    model = onnx.load(str(pkg / "model.onnx"))
    for init in model.graph.initializer:
        if init.name == "model.norm.weight":
            values = numpy_helper.to_array(init).copy()
            values[3] = np.nan
            init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, str(pkg / "model.onnx"))
    return pkg


def test_perplexity_never_reports_nan(random_package: Path, tmp_path: Path) -> None:
    pkg = _nan_package(random_package, tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    done = stlm("perplexity", str(pkg), str(text), "--ctx", "16", "--chunks", "2")
    assert_refused(done, "not finite")
    assert b"nan" not in done.stdout.lower()


def test_verify_counts_no_agreement_on_nan_logits() -> None:
    want = np.random.default_rng(0).normal(size=(8, 32)).astype(np.float64)
    tokens = [int(t) for t in want.argmax(axis=1)]
    have = np.full((8, 32), np.nan, np.float32)
    want[:, 0] = 50.0  # the reference's top-1 is token 0, which argmax of a NaN row also returns
    result = _prompt_result([1, 2], [0] * 8, want, have)
    assert result.top1_agree == 0 and result.greedy_agree == 0
    finite = _prompt_result([1, 2], tokens, want, want.astype(np.float32))
    assert finite.top1_agree == 8  # the same check counts agreement where the logits are finite


@pytest.mark.parametrize(
    ("value", "dtype", "needle"),
    [
        (np.nan, "fp32", "'model.layers.1.mlp.up_proj.weight' in model.safetensors holds 1 non-finite"),
        (1e6, "fp16", "model.layers.1.mlp.gate_up_proj.weight"),
    ],
)
def test_export_refuses_non_finite_weights(tmp_path: Path, value: float, dtype: str, needle: str) -> None:
    from safetensors.numpy import load_file, save_file

    ckpt = write_random_checkpoint(tmp_path / "ckpt", shape="tiny", seed=1)
    weights = load_file(ckpt / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name] = weights[name].astype(np.float32)
    weights[name][2, 5] = value
    save_file(weights, ckpt / "model.safetensors")
    out = tmp_path / "pkg"
    assert_refused(stlm("-q", "export", str(ckpt), "-o", str(out), "--dtype", dtype), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written, nothing left


def test_sigterm_during_export_cleans_up_like_ctrl_c(tmp_path: Path) -> None:
    ckpt = write_random_checkpoint(tmp_path / "ckpt", shape="medium", seed=2)
    out = tmp_path / "pkg"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stlm", "-q", "export", str(ckpt), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    partial = out.with_name(f".{out.name}.partial-{proc.pid}")
    deadline = time.monotonic() + TIMEOUT
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # into the writing of the weights
    assert proc.poll() is None, "the export ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert b"Traceback" not in err, err.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .pkg.partial-PID, no .pkg.lock
    shutil.rmtree(ckpt)
