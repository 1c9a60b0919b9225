"""Resolve what the user passed as MODEL: a local checkpoint folder, or a hub id when online."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from stlm.errors import CheckpointError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(model: str | Path, *, revision: str | None = None) -> Path:
    """Return a local folder holding the checkpoint ``model`` (downloading a hub id if possible).

    ``revision`` (a branch, tag or commit of a hub id) pins what is fetched; it does not apply to a
    local folder. Only config/tokenizer JSON and safetensors files are fetched: stlm never loads
    pickled weights and never runs a checkpoint's own code. With ``HF_HUB_OFFLINE=1`` the hub id
    is resolved in the local cache only (``HF_HUB_CACHE``; a revision is a branch or tag of the
    cache's ``refs/`` or a commit under ``snapshots/``); a snapshot's files are links into the
    cache's ``blobs/``, which the weight reader accepts only inside that repository's cache folder.
    """
    path = Path(model)
    if revision is not None and not (isinstance(revision, str) and revision.strip()):
        raise CheckpointError(
            f"revision={revision!r} is invalid: expected a branch, tag or commit of the hub repository",
            fix="pass e.g. revision='main', or omit it for the default branch",
        )
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(
                f"revision={revision!r} applies to hub ids, but {str(model)!r} is a local folder",
                fix="omit the revision, or check out that revision into the folder yourself",
            )
        return path
    if path.exists():
        raise CheckpointError(
            f"{str(model)!r} is a file, not a checkpoint folder",
            fix="pass the folder that holds config.json, *.safetensors and tokenizer.json",
        )
    text = str(model)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(
            f"checkpoint folder {text!r} does not exist",
            fix="pass an existing folder with config.json, *.safetensors and tokenizer.json, "
            "or a Hugging Face hub id such as stabilityai/stablelm-3b-4e1t",
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{text!r} is not a local folder and huggingface_hub is not installed to fetch it",
            fix=f"pip install huggingface_hub, or download {text} and pass its local folder",
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub"
    log.info("fetching %s%s from %s", text, f" at {revision}" if revision else "", where)
    try:
        return Path(
            snapshot_download(
                text, revision=revision, allow_patterns=["*.json", "*.safetensors"], local_files_only=offline
            )
        )
    except Exception as exc:  # noqa: BLE001 - any hub/network failure means the same to the user
        raise CheckpointError(
            f"could not fetch {text!r}{f' at revision {revision!r}' if revision else ''} from {where} "
            f"({type(exc).__name__}: {exc})",
            fix=f"check the id, the revision and the network (offline: that the cache holds this revision, "
            f"HF_HUB_CACHE), or download {text} elsewhere "
            f"(e.g. `hf download {text} --local-dir DIR`) and pass the local folder DIR",
        ) from None
