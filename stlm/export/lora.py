"""PEFT LoRA adapters merged into the base weights at export, one tensor at a time, in float32.

An adapter is the folder PEFT's ``save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors`` (read with :class:`~stlm.export.weights.SafetensorsCheckpoint`: no
torch, no pickle). For every targeted linear weight ``W`` (out, in) the merged weight is
``W + scale · B @ A`` with ``scale = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``), as
PEFT's ``merge_and_unload``; ``modules_to_save`` tensors replace the base's. :class:`MergedCheckpoint`
applies this as each weight is read, so the graph writer streams merged weights unchanged, and
casting or quantizing happens afterwards exactly as for a plain checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from stlm.config import ModelConfig, read_json
from stlm.errors import CheckpointError
from stlm.export.checkpoint import resolve_checkpoint
from stlm.export.weights import SafetensorsCheckpoint

log = logging.getLogger(__name__)

CONFIG_NAME: Final = "adapter_config.json"
WEIGHTS_NAME: Final = "adapter_model.safetensors"
LINEAR_MODULES: Final = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
_PREFIX: Final = "base_model.model."
_LORA_KEY: Final = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_SAVED_KEY: Final = re.compile(r"^(?P<module>.+)\.(?:modules_to_save|base_layer)\.(?P<param>[^.]+)$")
_PLAIN_KEY: Final = re.compile(r"^model\.embed_tokens\.weight$|^lm_head\.weight$")  # save_embedding_layers
_FIX_TARGETS: Final = (
    "train the adapter with target_modules among " + ", ".join(LINEAR_MODULES) + " (or 'all-linear'); "
    "put whole modules such as embed_tokens in modules_to_save instead"
)


def is_adapter_folder(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (``adapter_config.json`` and no ``config.json``)."""
    return (path / CONFIG_NAME).is_file() and not (path / "config.json").is_file()


@dataclass(frozen=True)
class LoraAdapter:
    """A validated LoRA adapter: the base weight each delta applies to, and its scale."""

    name: str
    folder: Path
    r: int
    alpha: float
    use_rslora: bool
    scale: float
    base_model: str | None
    targets: dict[str, tuple[str, str]]  # base weight name → (lora_A name, lora_B name)
    saved: dict[str, str]  # base tensor name → adapter tensor name (modules_to_save, saved embedding layers)
    tensors: SafetensorsCheckpoint
    sha256: str

    def record(self) -> dict[str, Any]:
        """What the package manifest says about the adapter merged into it."""
        modules = sorted({n.split(".")[-2] for n in self.targets})
        return {
            "name": self.name,
            "source": str(self.folder),
            "r": self.r,
            "lora_alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "scale": self.scale,
            "target_modules": modules,
            "replaced_tensors": sorted(self.saved),
            "base_model_name_or_path": self.base_model,
            "sha256": self.sha256,
        }

    def delta(self, name: str) -> np.ndarray:
        """``scale · B @ A`` in float32 for base weight ``name`` (out, in)."""
        a_name, b_name = self.targets[name]
        a, b = self.tensors.read(a_name, np.float32), self.tensors.read(b_name, np.float32)
        return np.float32(self.scale) * (b @ a)


def _bad(folder: Path, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(f"adapter {folder}: {problem}", fix=fix)


def _config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise _bad(folder, f"no {CONFIG_NAME}", "pass the folder PEFT's save_pretrained wrote for the adapter")
    try:
        data = read_json(path)
    except (OSError, ValueError, RecursionError) as exc:
        raise _bad(folder, f"{CONFIG_NAME} is not readable JSON ({str(exc)[:200]})", "save the adapter again") from None
    if not isinstance(data, dict):
        raise _bad(folder, f"{CONFIG_NAME} is {type(data).__name__}, expected an object", "save the adapter again")
    return data


def _check_kind(folder: Path, cfg: dict[str, Any]) -> None:
    """Only plain LoRA: no other PEFT method, no DoRA, no trained biases, no per-module ranks."""
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise _bad(
            folder,
            f"peft_type is {kind!r}; stlm merges LoRA adapters only",
            "merge the adapter with PEFT's merge_and_unload(), save the model, and export that checkpoint",
        )
    unsupported = {
        "use_dora": cfg.get("use_dora") not in (None, False),
        "bias": cfg.get("bias", "none") not in (None, "none"),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
    }
    for key, bad in unsupported.items():
        if bad:
            raise _bad(
                folder,
                f"{key}={cfg.get(key)!r} is not supported (plain LoRA with one r and lora_alpha only)",
                "merge it with PEFT's merge_and_unload(), save the model, and export that checkpoint",
            )


def _rank_and_scale(folder: Path, cfg: dict[str, Any]) -> tuple[int, float, bool, float]:
    r, alpha, rslora = cfg.get("r"), cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora", False))
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise _bad(folder, f"r={r!r} is not a positive integer", "save the adapter again with PEFT")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise _bad(folder, f"lora_alpha={alpha!r} is not a number", "save the adapter again with PEFT")
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    return r, float(alpha), rslora, scale


def _check_target_names(folder: Path, cfg: dict[str, Any]) -> None:
    targets = cfg.get("target_modules")
    if isinstance(targets, str) or targets is None:
        return  # 'all-linear' or a regex: the stored tensors are checked one by one instead
    unknown = sorted(str(t) for t in targets if str(t).split(".")[-1] not in LINEAR_MODULES)
    if unknown:
        raise _bad(folder, f"target_modules {unknown} are not linear layers stlm can merge", _FIX_TARGETS)


def _weights(folder: Path) -> Path:
    path = folder / WEIGHTS_NAME
    if path.is_file():
        return path
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    found = f" (found {', '.join(pickled)}: pickled weights, which stlm never loads)" if pickled else ""
    raise _bad(
        folder,
        f"no {WEIGHTS_NAME}{found}",
        "load the adapter with PEFT and save it again with save_pretrained(DIR, safe_serialization=True)",
    )


def _split_keys(folder: Path, tensors: SafetensorsCheckpoint) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """Adapter tensor names → (targets: base weight → (A, B), saved: base tensor → adapter tensor)."""
    parts: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}
    for key in tensors.names():
        inner = key.removeprefix(_PREFIX)
        if (m := _SAVED_KEY.match(inner)) is not None:
            saved[f"{m['module']}.{m['param']}"] = key
        elif _PLAIN_KEY.match(inner):
            saved[inner] = key
        elif (m := _LORA_KEY.match(inner)) is not None and m["module"].split(".")[-1] in LINEAR_MODULES:
            parts.setdefault(f"{m['module']}.weight", {})[m["part"]] = key
        else:
            raise _bad(folder, f"tensor {key!r} is not a LoRA weight of a linear layer stlm can merge", _FIX_TARGETS)
    for name, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise _bad(folder, f"{name}: lora_A or lora_B is missing", "save the adapter again with PEFT")
    return {n: (ab["A"], ab["B"]) for n, ab in parts.items()}, saved


def _check_shapes(adapter: LoraAdapter, base: SafetensorsCheckpoint, cfg: ModelConfig) -> None:
    """Every delta and saved module fits the base tensor it changes."""
    fix = "pass the base checkpoint this adapter was trained on (--base), or the adapter trained on this base"
    for name, (a_name, b_name) in adapter.targets.items():
        if name == "lm_head.weight" and (cfg.tie_word_embeddings or name not in base):
            raise _bad(
                adapter.folder,
                "it targets lm_head, but this base ties the LM head to the embedding",
                "train the adapter without lm_head in target_modules",
            )
        if name not in base:
            raise _bad(adapter.folder, f"it changes {name!r}, which the base checkpoint does not have", fix)
        out, inp = base.shape(name)
        a, b = adapter.tensors.shape(a_name), adapter.tensors.shape(b_name)
        if a != (adapter.r, inp) or b != (out, adapter.r):
            raise _bad(
                adapter.folder,
                f"{name}: lora_A {list(a)} and lora_B {list(b)} do not fit the base weight {[out, inp]} "
                f"with r={adapter.r} (expected {[adapter.r, inp]} and {[out, adapter.r]})",
                fix,
            )
    for name, key in adapter.saved.items():
        if name not in base or base.shape(name) != adapter.tensors.shape(key):
            found = list(base.shape(name)) if name in base else "absent"
            raise _bad(
                adapter.folder,
                f"modules_to_save tensor {key!r} {list(adapter.tensors.shape(key))} does not fit the base's "
                f"{name!r} ({found})",
                fix,
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_adapter(source: str | Path, *, revision: str | None = None) -> LoraAdapter:
    """The adapter in folder (or hub id) ``source``, with its config and tensor names checked."""
    folder = resolve_checkpoint(source, revision=revision)
    cfg = _config(folder)
    _check_kind(folder, cfg)
    r, alpha, rslora, scale = _rank_and_scale(folder, cfg)
    _check_target_names(folder, cfg)
    if cfg.get("fan_in_fan_out"):
        log.warning("adapter %s: fan_in_fan_out=True does not apply to Linear layers: ignored, as PEFT does", folder)
    weights = _weights(folder)
    tensors = SafetensorsCheckpoint(folder)
    targets, saved = _split_keys(folder, tensors)
    if not targets and not saved:
        raise _bad(folder, f"{WEIGHTS_NAME} holds no LoRA weights", "save the trained adapter again with PEFT")
    base = cfg.get("base_model_name_or_path")
    return LoraAdapter(
        name=Path(str(source)).name or str(source),
        folder=folder,
        r=r,
        alpha=alpha,
        use_rslora=rslora,
        scale=scale,
        base_model=base if isinstance(base, str) else None,
        targets=targets,
        saved=saved,
        tensors=tensors,
        sha256=_sha256(weights),
    )


def _same_model(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/") or Path(a.rstrip("/")).name == Path(b.rstrip("/")).name


class MergedCheckpoint(SafetensorsCheckpoint):
    """The base checkpoint as it reads with ``adapter`` merged in (float32 merge, one tensor per read)."""

    def __init__(self, base: SafetensorsCheckpoint, adapter: LoraAdapter, cfg: ModelConfig, source: str) -> None:
        _check_shapes(adapter, base, cfg)
        if adapter.base_model and not _same_model(adapter.base_model, source):
            log.warning(
                "adapter %s was trained on %r, but the base is %r: check that this is the base you mean",
                adapter.folder,
                adapter.base_model,
                source,
            )
        self.entries = base.entries
        self.adapter = adapter

    def read(self, name: str, dtype: np.dtype | type | None = None) -> np.ndarray:
        """Tensor ``name`` with the adapter applied, converted to ``dtype`` (float32 by default)."""
        target = np.dtype(dtype or np.float32)
        saved = self.adapter.saved.get(name)
        if name not in self.adapter.targets:
            return super().read(name, dtype) if saved is None else self.adapter.tensors.read(saved, target)
        weight = super().read(name, np.float32) if saved is None else self.adapter.tensors.read(saved, np.float32)
        merged = weight + self.adapter.delta(name)
        return merged if merged.dtype == target else merged.astype(target)
