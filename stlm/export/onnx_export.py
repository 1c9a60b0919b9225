"""Stage: checkpoint folder → self-contained ONNX package folder (graph, tokenizer, manifest)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx

import stlm
from stlm.errors import CheckpointError, InvalidArgumentError
from stlm.export.graph import build_decoder, estimate_weight_bytes
from stlm.export.precision import plan_precision
from stlm.export.quantize import parse_quantization
from stlm.export.tokenizer_files import TokenizerFiles, write_tokenizer_files
from stlm.export.validate import check_tokenizer, check_weights
from stlm.export.weights import SafetensorsCheckpoint
from stlm.package.checkpoint import resolve_checkpoint
from stlm.package.config import ModelConfig, load_model_config
from stlm.package.contract import decoder_contract
from stlm.package.dtypes import parse_dtype
from stlm.package.manifest import Generation, Manifest, read_manifest, write_manifest
from stlm.package.ort_versions import MAX_OPSET, required_onnxruntime
from stlm.package.variant import (
    KV_CACHES,
    TARGETS,
    TENSORRT_ROTARIES,
    KVCache,
    Quantization,
    Rotary,
    Target,
    Variant,
)
from stlm.support.progress import Progress
from stlm.support.staging import check_output, staged_folder

log = logging.getLogger(__name__)
_T = TypeVar("_T")

GRAPH_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
TOKENIZER_NAME = "tokenizer.json"
DEFAULT_OPSET = 18
MIN_OPSET = 17  # LayerNormalization
NATIVE_ROTARY_OPSET = 23  # RotaryEmbedding
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf's hard limit is 2 GiB; keep a margin


def _check_opset(opset: int) -> None:
    newest = min(onnx.defs.onnx_opset_version(), MAX_OPSET)
    if not MIN_OPSET <= opset <= newest:
        raise InvalidArgumentError(
            f"opset {opset} is not supported; expected {MIN_OPSET}..{newest}",
            fix=f"pass --opset {MIN_OPSET}..{newest} (default {DEFAULT_OPSET})",
        )


def _member(value: str, choices: tuple[_T, ...]) -> _T | None:
    """``value`` as the (Literal-typed) member of ``choices`` it equals, or None."""
    return next((c for c in choices if c == value), None)


def _target(target: str | None, rotary: str | None) -> Target:
    name = target or ("tensorrt" if rotary in TENSORRT_ROTARIES else "onnxruntime")
    chosen = _member(name, TARGETS)
    if chosen is None:
        raise InvalidArgumentError(
            f"unknown target {name!r}; expected onnxruntime or tensorrt",
            fix="pass --target onnxruntime or --target tensorrt",
        )
    return chosen


def _graph_form(target: Target, rotary: str | None, kv_cache: str | None) -> tuple[KVCache, Rotary]:
    """The KV cache and rotary form of the graph (defaults by target), or an error naming the flag."""
    tensorrt = target == "tensorrt"
    chosen_rotary = None if rotary is None else _member(rotary, TENSORRT_ROTARIES)
    if rotary is not None and (chosen_rotary is None or not tensorrt):
        raise InvalidArgumentError(
            f"rotary {rotary!r} does not go with target {target!r}",
            fix="--rotary plugin|native applies to --target tensorrt only",
        )
    name = kv_cache or ("concat" if tensorrt else "inplace")
    kv = _member(name, KV_CACHES)
    if kv is None:
        raise InvalidArgumentError(
            f"unknown KV cache kind {name!r}; expected one of {', '.join(KV_CACHES)}",
            fix="pass --kv-cache inplace (ONNX Runtime, fastest) or concat (portable)",
        )
    if kv == "inplace" and tensorrt:
        raise InvalidArgumentError(
            "the TensorRT target needs --kv-cache concat (got inplace)",
            fix="pass --kv-cache concat with --target tensorrt",
        )
    if chosen_rotary is not None:
        return kv, chosen_rotary
    return kv, "plugin" if tensorrt else "fused" if kv == "inplace" else "plain"


def _quantization(quantize: str | None, target: Target) -> Quantization | None:
    if quantize is None:
        return None
    quantization = parse_quantization(quantize)
    if target == "tensorrt":
        raise InvalidArgumentError(
            f"--quantize {quantize} uses ONNX Runtime's MatMulNBits, which the TensorRT target does not take",
            fix="omit --quantize with --target tensorrt",
        )
    return quantization


def plan_variant(
    cfg: ModelConfig,
    *,
    dtype: str,
    target: str | None,
    rotary: str | None,
    kv_cache: str | None,
    quantize: str | None,
    opset: int,
) -> tuple[Variant, int]:
    """The :class:`Variant` these export options describe, and the opset to write (validated)."""
    kind = parse_dtype(dtype)
    chosen = _target(target, rotary)
    kv, form = _graph_form(chosen, rotary, kv_cache)
    quantization = _quantization(quantize, chosen)
    if form == "native" and opset < NATIVE_ROTARY_OPSET:
        log.info("ONNX RotaryEmbedding needs opset %d: exporting at opset %d", NATIVE_ROTARY_OPSET, NATIVE_ROTARY_OPSET)
        opset = NATIVE_ROTARY_OPSET
    _check_opset(opset)
    precision = plan_precision(kind, target=chosen, kv_cache=kv)
    variant = Variant(
        target=chosen,
        kv_cache=kv,
        rotary=form,
        weight_dtype=precision.weights,
        compute_dtype=precision.compute,
        kv_dtype=precision.kv,
        quantization=quantization,
        precision_note=precision.note,
        external_data=estimate_weight_bytes(cfg, kind) > EXTERNAL_DATA_THRESHOLD,
    )
    return dataclasses.replace(variant, min_onnxruntime=required_onnxruntime(variant, opset)), opset


def _manifest(cfg: ModelConfig, variant: Variant, opset: int, source: str, chat: TokenizerFiles) -> Manifest:
    return Manifest(
        kind="onnx",
        graph=GRAPH_NAME,
        tokenizer=TOKENIZER_NAME,
        model=cfg,
        contract=decoder_contract(cfg, variant),
        generation=Generation(
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.eos_token_id,
            context_length=cfg.max_position_embeddings,
        ),
        versions={"stlm": stlm.__version__, "onnx": onnx.__version__, "numpy": np.__version__, "opset": opset},
        variant=variant,
        extra={"source": source},
        chat_template=chat.chat_template,
        tokenizer_config=chat.tokenizer_config,
    )


def export_onnx(
    model: str | Path,
    out: Path,
    *,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    target: str | None = None,
    rotary: str | None = None,
    kv_cache: str | None = None,
    quantize: str | None = None,
    chat_template: str | Path | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Export checkpoint ``model`` (folder or hub id) to the package folder ``out``; return ``out``.

    The folder is written under a temporary name and renamed when complete, so a failed export
    leaves nothing behind. ``rotary='plugin'`` writes the TensorRT-target graph whose rotary runs in
    the ``stlm::partial_rotary`` plugin; ``rotary='native'`` the TensorRT-target graph with ONNX's
    own ``RotaryEmbedding`` (opset ≥ 23). ``kv_cache``: 'inplace' (default for ONNX Runtime) or
    'concat' (portable ops; the default, and the only choice, for the TensorRT targets).
    ``chat_template`` (a file, or the template text) replaces the checkpoint's chat template
    (:mod:`stlm.export.tokenizer_files`). ``revision``: the branch, tag or commit of a hub id.
    """
    out = Path(out)
    parse_dtype(dtype)
    protect = [Path(model)] if Path(model).exists() else []
    check_output(out, overwrite=overwrite, protect=protect)
    checkpoint = resolve_checkpoint(model, revision=revision)
    cfg = load_model_config(checkpoint)
    variant, opset = plan_variant(
        cfg, dtype=dtype, target=target, rotary=rotary, kv_cache=kv_cache, quantize=quantize, opset=opset
    )
    tokenizer = checkpoint / TOKENIZER_NAME
    if not tokenizer.is_file():
        raise CheckpointError(
            f"no {TOKENIZER_NAME} in {checkpoint}",
            fix="copy the checkpoint's tokenizer.json (the fast tokenizer file) into the folder",
        )
    ckpt = SafetensorsCheckpoint(checkpoint)
    check_weights(cfg, ckpt, str(checkpoint))
    check_tokenizer(cfg, tokenizer)
    start = time.perf_counter()
    with staged_folder(out, overwrite=overwrite, protect=[checkpoint]) as tmp:
        data_path = tmp / DATA_NAME if variant.external_data else None
        graph = build_decoder(cfg, ckpt, variant, opset=opset, data_path=data_path, progress=progress)
        (tmp / GRAPH_NAME).write_bytes(graph.SerializeToString())
        del graph
        onnx.checker.check_model(str(tmp / GRAPH_NAME))
        if progress:
            progress("checked", 1, 1)
        shutil.copyfile(tokenizer, tmp / TOKENIZER_NAME)
        chat = write_tokenizer_files(checkpoint, tmp, chat_template)
        write_manifest(tmp, _manifest(cfg, variant, opset, str(model), chat))
        read_manifest(tmp)  # a package written is a package that loads
    log.info("exported %s → %s in %.1f s", model, out, time.perf_counter() - start)
    return out
