"""Resolve what the user passed as MODEL: a local checkpoint folder, or a hub id when online."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from stlm.errors import CheckpointError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(model: str | Path, *, revision: str | None = None) -> Path:
    """Return a local folder holding the checkpoint ``model`` (downloading a hub id if possible).

    ``revision`` (a branch, tag or commit of a hub id) pins what is fetched; it does not apply to a
    local folder. Only config/tokenizer JSON and safetensors files are fetched: stlm never loads
    pickled weights and never runs a checkpoint's own code.
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
    log.info("fetching %s%s from the Hugging Face hub", text, f" at {revision}" if revision else "")
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # noqa: BLE001 - any hub/network failure means the same to the user
        raise CheckpointError(
            f"could not fetch {text!r}{f' at revision {revision!r}' if revision else ''} from the Hugging Face "
            f"hub ({type(exc).__name__}: {exc})",
            fix=f"check the id, the revision and the network, or download {text} elsewhere "
            f"(e.g. `hf download {text} --local-dir DIR`) and pass the local folder DIR",
        ) from None
