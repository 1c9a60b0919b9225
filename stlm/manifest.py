"""The package manifest (``stlm.json``): everything the runtime needs to know about a package.

Written by export (ONNX packages) and build-engine (engine packages); read by the runtime,
which needs nothing but the package folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from stlm.config import ModelConfig
from stlm.contract import Contract
from stlm.errors import PackageError

MANIFEST_NAME: Final = "stlm.json"
FORMAT: Final = "stlm-package"
FORMAT_VERSION: Final = 1


@dataclass(frozen=True)
class Generation:
    """Generation defaults recorded at export."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    context_length: int


@dataclass(frozen=True)
class Manifest:
    """A package's description. ``kind`` is 'onnx' or 'tensorrt'; file names are folder-relative."""

    kind: str
    graph: str
    tokenizer: str
    dtype: str
    model: ModelConfig
    contract: Contract
    generation: Generation
    versions: dict[str, Any]
    variant: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: the Jinja chat template file and the special tokens it reads (None: the checkpoint had none)
    chat_template: str | None = None
    tokenizer_config: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "graph": self.graph,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "variant": self.variant,
            "model": self.model.to_dict(),
            "contract": self.contract.to_dict(),
            "generation": vars(self.generation),
            "versions": self.versions,
            "extra": self.extra,
            "chat_template": self.chat_template,
            "tokenizer_config": self.tokenizer_config,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Inverse of :meth:`to_dict`."""
        return cls(
            kind=data["kind"],
            graph=data["graph"],
            tokenizer=data["tokenizer"],
            dtype=data["dtype"],
            model=ModelConfig.from_dict(data["model"]),
            contract=Contract.from_dict(data["contract"]),
            generation=Generation(**data["generation"]),
            versions=dict(data.get("versions", {})),
            variant=dict(data.get("variant", {})),
            extra=dict(data.get("extra", {})),
            chat_template=_optional_name(data.get("chat_template")),
            tokenizer_config=_optional_name(data.get("tokenizer_config")),
        )


def _optional_name(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"a file name is {type(value).__name__}, expected a string")
    return value


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``folder/stlm.json`` and return its path."""
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: Path) -> Manifest:
    """Read and check a package folder's manifest; the files it names must exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PackageError(
            f"package folder {str(folder)!r} does not exist",
            fix="pass the folder written by `stlm export` (or `stlm build-engine`)",
        )
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise PackageError(
            f"{folder} has no {MANIFEST_NAME}, so it is not an stlm package",
            fix="pass the folder written by `stlm export -o FOLDER`, or export again",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"format_version {data['format_version']} is newer than this stlm reads")
        manifest = Manifest.from_dict(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise PackageError(
            f"{path} is not a valid stlm manifest ({exc})",
            fix="export the package again with this version of stlm",
        ) from None
    for name in (manifest.graph, manifest.tokenizer, manifest.chat_template, manifest.tokenizer_config):
        if name is not None and not (folder / name).is_file():
            raise PackageError(
                f"{folder} lacks {name}, which its manifest names",
                fix="copy the whole package folder, or export again",
            )
    return manifest
