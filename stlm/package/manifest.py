"""The package manifest (``stlm.json``): everything the runtime needs to know about a package.

Written by export (ONNX packages) and build-engine (engine packages); read by the runtime,
which needs nothing but the package folder. ``format_version`` 2 records the graph as a typed
:class:`~stlm.package.variant.Variant`; packages of version 1 (no ``logits_index`` input) must be exported
again. The stored I/O contract is checked against the one the variant implies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal

from stlm.errors import PackageError
from stlm.package.config import ModelConfig
from stlm.package.contract import Contract, decoder_contract
from stlm.package.dtypes import DType
from stlm.package.variant import Variant

MANIFEST_NAME: Final = "stlm.json"
FORMAT: Final = "stlm-package"
FORMAT_VERSION: Final = 2
EXPORT_AGAIN: Final = "export the package again with this version of stlm"
_MAX_MANIFEST_BYTES: Final = 16 << 20

PackageKind = Literal["onnx", "tensorrt"]
PACKAGE_KINDS: Final[tuple[PackageKind, ...]] = ("onnx", "tensorrt")


@dataclass(frozen=True)
class Generation:
    """Generation defaults recorded at export."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    context_length: int


@dataclass(frozen=True)
class Manifest:
    """A package's description. File names are folder-relative; ``extra`` is the engine build record."""

    kind: PackageKind
    graph: str
    tokenizer: str
    model: ModelConfig
    contract: Contract
    generation: Generation
    versions: dict[str, Any]
    variant: Variant
    extra: dict[str, Any] = field(default_factory=dict)
    #: the Jinja chat template file and the special tokens it reads (None: the checkpoint had none)
    chat_template: str | None = None
    tokenizer_config: str | None = None

    @property
    def dtype(self) -> DType:
        """The package dtype (that of its stored weights)."""
        return self.variant.weight_dtype

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "graph": self.graph,
            "tokenizer": self.tokenizer,
            "variant": self.variant.to_dict(),
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
        """Inverse of :meth:`to_dict`; malformed records raise ``ValueError``/``KeyError``/``TypeError``
        (:func:`read_manifest` turns them into a :class:`PackageError`) or a :class:`PackageError`."""
        kind = data["kind"]
        if kind not in PACKAGE_KINDS:
            raise ValueError(f"kind is {kind!r}, expected one of {', '.join(PACKAGE_KINDS)}")
        manifest = cls(
            kind=kind,
            graph=_name(data["graph"]),
            tokenizer=_name(data["tokenizer"]),
            model=ModelConfig.from_dict(data["model"]),
            contract=Contract.from_dict(data["contract"]),
            generation=_generation(data["generation"]),
            versions=dict(data.get("versions", {})),
            variant=Variant.from_dict(data["variant"]),
            extra=dict(data.get("extra", {})),
            chat_template=_optional_name(data.get("chat_template")),
            tokenizer_config=_optional_name(data.get("tokenizer_config")),
        )
        if manifest.contract != decoder_contract(manifest.model, manifest.variant):
            raise ValueError("its contract differs from the graph variant it records")
        return manifest


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a file name is {type(value).__name__}, expected a string")
    return value


def _optional_name(value: Any) -> str | None:
    return None if value is None else _name(value)


def _generation(data: Any) -> Generation:
    if not isinstance(data, dict):
        raise TypeError(f"generation is {type(data).__name__}, expected an object")
    generation = Generation(**data)
    for key, value in vars(generation).items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"generation.{key} is {value!r}, expected a non-negative integer")
    if generation.context_length < 1:
        raise ValueError("generation.context_length is 0, expected at least 1")
    return generation


def confined_file(folder: Path, name: str) -> Path:
    """``folder/name``, which must be a file inside ``folder`` (a relative path without ``..``, and
    no symlink leading out); else a :class:`PackageError`."""
    inner = PurePosixPath(name)
    path = folder / name
    root = folder.resolve()
    if inner.is_absolute() or ".." in inner.parts or not name or "\\" in name:
        raise PackageError(
            f"{folder}/{MANIFEST_NAME} names the file {name!r}, which is not inside the package",
            fix="a package names only its own files: " + EXPORT_AGAIN,
        )
    real = path.resolve()
    if real != root and root not in real.parents:
        raise PackageError(
            f"{path} leads out of the package (to {real})",
            fix="copy the package with its files (not symlinks to elsewhere), or " + EXPORT_AGAIN,
        )
    if not real.is_file():
        raise PackageError(
            f"{folder} lacks {name}, which its manifest names",
            fix="copy the whole package folder, or export again",
        )
    return path


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``folder/stlm.json`` and return its path."""
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def _check_format(data: Any) -> None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"format is {found!r}, expected {FORMAT!r}")
    version = data.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PackageError(
            f"the package's format_version {version!r} is newer than this stlm reads ({FORMAT_VERSION})",
            fix="upgrade stlm (pip install -U stlm), or export the package with this version",
        )
    if version < FORMAT_VERSION:
        raise PackageError(
            f"the package has format_version {version}, written by an older stlm; this stlm reads "
            f"version {FORMAT_VERSION} (graphs with a logits_index input)",
            fix=EXPORT_AGAIN,
        )


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
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise ValueError(f"it has more than {_MAX_MANIFEST_BYTES} bytes")
        data = json.loads(path.read_bytes().decode("utf-8"))
        _check_format(data)
        manifest = Manifest.from_dict(data)
    except PackageError as exc:
        raise PackageError(f"{path}: {exc.problem}", fix=exc.fix) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        raise PackageError(f"{path} is not a valid stlm manifest ({reason})", fix=EXPORT_AGAIN) from None
    for name in (manifest.graph, manifest.tokenizer, manifest.chat_template, manifest.tokenizer_config):
        if name is not None:
            confined_file(folder, name)
    return manifest
