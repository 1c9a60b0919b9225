"""`stlm export HUB_ID` offline, from a Hugging Face cache snapshot (files linked into blobs/).

The cache is laid out as huggingface_hub writes it (``models--org--name/{blobs,refs,snapshots}``,
snapshot files relative links to ``../../blobs/<hash>``); huggingface_hub's own
``try_to_load_from_cache`` and ``snapshot_download(local_files_only=True)`` must find it before
stlm is asked to. A weight file linking outside the repository's cache folder is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stlm.errors import CheckpointError
from stlm.export.weights import SafetensorsCheckpoint
from stlm.testing import write_random_checkpoint

pytestmark = pytest.mark.slow
huggingface_hub = pytest.importorskip("huggingface_hub")

REPO = "stlm-test/tiny-offline"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(checkpoint: Path, cache: Path) -> Path:
    """A hub cache holding ``checkpoint`` as REPO at COMMIT (refs/main → COMMIT); its snapshot folder."""
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for file in sorted(checkpoint.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / digest)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", digest))
    return snapshot


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("hub")
    checkpoint = write_random_checkpoint(base / "checkpoint", shape="tiny", seed=5)
    snapshot = _fake_cache(checkpoint, base / "cache")
    return base / "cache", snapshot


def test_huggingface_hub_finds_the_fake_cache(cache: tuple[Path, Path]) -> None:
    root, snapshot = cache
    found = huggingface_hub.try_to_load_from_cache(REPO, "config.json", cache_dir=root, revision="main")
    assert found == str(snapshot / "config.json")
    local = huggingface_hub.snapshot_download(REPO, revision=COMMIT, cache_dir=root, local_files_only=True)
    assert Path(local) == snapshot


@pytest.mark.parametrize("revision", ["main", COMMIT])
def test_export_offline_from_the_cache(cache: tuple[Path, Path], tmp_path: Path, revision: str) -> None:
    root, snapshot = cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root), "HF_HOME": str(tmp_path / "home")}
    out = tmp_path / "package"
    command = [sys.executable, "-m", "stlm", "export", REPO, "-o", str(out), "--revision", revision]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((out / "stlm.json").read_text())
    config = json.loads((snapshot / "config.json").read_text())
    assert manifest["model"]["vocab_size"] == config["vocab_size"]


def test_offline_without_the_revision_in_the_cache_is_an_error(cache: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root), "HF_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "stlm", "export", REPO, "-o", str(tmp_path / "p"), "--revision", "v9"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "error:" in run.stderr and "HF_HUB_OFFLINE" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_a_weight_link_leaving_the_cache_is_refused(cache: tuple[Path, Path], tmp_path: Path) -> None:
    root, snapshot = cache
    SafetensorsCheckpoint(snapshot)  # the links into blobs/ are accepted
    copy = tmp_path / "cache"
    shutil.copytree(root, copy, symlinks=True)
    outside = tmp_path / "elsewhere.safetensors"
    victim = copy / snapshot.relative_to(root) / "model.safetensors"
    shutil.copyfile(victim.resolve(), outside)
    victim.unlink()
    victim.symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        SafetensorsCheckpoint(victim.parent)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").symlink_to(outside)  # a plain folder: its own files only
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        SafetensorsCheckpoint(plain)
