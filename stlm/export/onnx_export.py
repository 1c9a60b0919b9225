"""Stage: checkpoint folder → self-contained ONNX package folder (graph, tokenizer, manifest)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import onnx

import stlm
from stlm.config import load_model_config
from stlm.contract import KV_CACHE_KINDS, decoder_contract
from stlm.dtypes import DType, parse_dtype
from stlm.errors import CheckpointError, InvalidArgumentError
from stlm.export.checkpoint import resolve_checkpoint
from stlm.export.graph import (
    ACCURACY_LEVEL,
    LM_HEAD_BITS,
    TENSORRT_ROTARIES,
    Progress,
    Rotary,
    build_decoder,
    estimate_weight_bytes,
)
from stlm.export.precision import plan_precision
from stlm.export.quantize import BLOCK_SIZE, QUANT_BITS
from stlm.export.staging import staged_folder
from stlm.export.tokenizer_files import write_tokenizer_files
from stlm.export.weights import SafetensorsCheckpoint
from stlm.manifest import Generation, Manifest, write_manifest

log = logging.getLogger(__name__)

GRAPH_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
TOKENIZER_NAME = "tokenizer.json"
MIN_OPSET = 17  # LayerNormalization
NATIVE_ROTARY_OPSET = 23  # RotaryEmbedding
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf's hard limit is 2 GiB; keep a margin


def _check_opset(opset: int) -> None:
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise InvalidArgumentError(
            f"opset {opset} is not supported; expected {MIN_OPSET}..{newest}",
            fix=f"pass --opset {MIN_OPSET}..{newest} (default 18)",
        )


def export_onnx(
    model: str | Path,
    out: Path,
    *,
    dtype: str = "fp32",
    opset: int = 18,
    target: str | None = None,
    rotary: Rotary | None = None,
    kv_cache: str | None = None,
    quantize: str | None = None,
    chat_template: str | Path | None = None,
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
    (:mod:`stlm.export.tokenizer_files`).
    """
    target = target or ("tensorrt" if rotary in TENSORRT_ROTARIES else "onnxruntime")
    if target not in ("onnxruntime", "tensorrt"):
        raise InvalidArgumentError(
            f"unknown target {target!r}; expected onnxruntime or tensorrt",
            fix="pass --target onnxruntime or --target tensorrt",
        )
    tensorrt = target == "tensorrt"
    if rotary is None:
        rotary = "plugin" if tensorrt else "plain"
    if tensorrt != (rotary in TENSORRT_ROTARIES):
        raise InvalidArgumentError(
            f"rotary {rotary!r} does not go with target {target!r}",
            fix="--rotary plugin|native applies to --target tensorrt only",
        )
    kv_cache = kv_cache or ("concat" if tensorrt else "inplace")
    if rotary == "native" and opset < NATIVE_ROTARY_OPSET:
        log.info("ONNX RotaryEmbedding needs opset %d: exporting at opset %d", NATIVE_ROTARY_OPSET, NATIVE_ROTARY_OPSET)
        opset = NATIVE_ROTARY_OPSET
    out = Path(out)
    kind: DType = parse_dtype(dtype)
    _check_opset(opset)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgumentError(
            f"output folder {str(out)!r} already exists and is not empty",
            fix="pass another -o folder, or --overwrite to replace it",
        )
    checkpoint = resolve_checkpoint(model)
    cfg = load_model_config(checkpoint)
    tokenizer = checkpoint / TOKENIZER_NAME
    if not tokenizer.is_file():
        raise CheckpointError(
            f"no {TOKENIZER_NAME} in {checkpoint}",
            fix="copy the checkpoint's tokenizer.json (the fast tokenizer file) into the folder",
        )
    ckpt = SafetensorsCheckpoint(checkpoint)
    if kv_cache not in KV_CACHE_KINDS:
        raise InvalidArgumentError(
            f"unknown KV cache kind {kv_cache!r}; expected one of {', '.join(KV_CACHE_KINDS)}",
            fix="pass --kv-cache inplace (ONNX Runtime, fastest) or concat (portable)",
        )
    if kv_cache == "inplace" and tensorrt:
        raise InvalidArgumentError(
            "the TensorRT target needs --kv-cache concat (got inplace)",
            fix="pass --kv-cache concat with --target tensorrt",
        )
    if quantize is not None and quantize not in QUANT_BITS:
        raise InvalidArgumentError(
            f"unknown quantization {quantize!r}; expected one of {', '.join(QUANT_BITS)}",
            fix="pass --quantize int8 or --quantize int4, or omit it",
        )
    if quantize is not None and tensorrt:
        raise InvalidArgumentError(
            f"--quantize {quantize} uses ONNX Runtime's MatMulNBits, which the TensorRT target does not take",
            fix="omit --quantize with --target tensorrt",
        )
    precision = plan_precision(kind, target="tensorrt" if tensorrt else "onnxruntime", kv_cache=kv_cache)
    contract = decoder_contract(cfg, precision.kv, kv_cache)
    external = estimate_weight_bytes(cfg, kind) > EXTERNAL_DATA_THRESHOLD

    start = time.perf_counter()
    with staged_folder(out) as tmp:
        graph = build_decoder(
            cfg,
            ckpt,
            contract,
            kind,
            opset=opset,
            rotary=rotary,
            kv_cache=kv_cache,
            quantize=quantize,
            precision=precision,
            progress=progress,
            data_path=tmp / DATA_NAME if external else None,
        )
        (tmp / GRAPH_NAME).write_bytes(graph.SerializeToString())
        del graph
        onnx.checker.check_model(str(tmp / GRAPH_NAME))
        if progress:
            progress("checked", 1, 1)
        shutil.copyfile(tokenizer, tmp / TOKENIZER_NAME)
        chat = write_tokenizer_files(checkpoint, tmp, chat_template)
        manifest = Manifest(
            kind="onnx",
            graph=GRAPH_NAME,
            tokenizer=TOKENIZER_NAME,
            dtype=kind,
            model=cfg,
            contract=contract,
            generation=Generation(
                bos_token_id=cfg.bos_token_id,
                eos_token_id=cfg.eos_token_id,
                pad_token_id=cfg.eos_token_id,
                context_length=cfg.max_position_embeddings,
            ),
            versions={
                "stlm": stlm.__version__,
                "onnx": onnx.__version__,
                "numpy": np.__version__,
                "opset": opset,
                "exporter": "stlm.export.graph",
            },
            variant={
                "target": "tensorrt" if tensorrt else "onnxruntime",
                "rotary": rotary,
                "kv_cache": kv_cache,
                "quantization": None
                if quantize is None
                else {
                    "method": "MatMulNBits",
                    "bits": QUANT_BITS[quantize],
                    "block_size": BLOCK_SIZE,
                    "lm_head_bits": max(QUANT_BITS[quantize], LM_HEAD_BITS),
                    "accuracy_level": ACCURACY_LEVEL,
                },
                "external_data": external,
                **precision.to_variant(),
            },
            extra={"source": str(model)},
            chat_template=chat.chat_template,
            tokenizer_config=chat.tokenizer_config,
        )
        write_manifest(tmp, manifest)
    log.info("exported %s → %s in %.1f s", model, out, time.perf_counter() - start)
    return out
