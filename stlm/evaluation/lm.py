"""lm-evaluation-harness model ``stlm``: a compiled package behind lm-eval's ``LM`` interface.

``StlmLM`` runs a package with :mod:`stlm.runtime` (no torch, no transformers of its own) and
answers lm-eval's three request types with the semantics of lm-eval's ``hf`` model, so a package
and its checkpoint score the same items the same way:

* ``loglikelihood``: lm-eval's own ``TemplateLM`` splits context and continuation (trailing
  spaces of the context move to the continuation; the pair is encoded whole and split at the
  context's length; an empty context becomes the prefix token, BOS = ``<|endoftext|>``). No BOS
  is added otherwise: the GPT-NeoX tokenizer has ``add_bos_token=False``, as in transformers.
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens, the
  first one conditioned on the prefix token.
* ``generate_until``: contexts left-truncated to ``max_length - max_gen_toks`` tokens, greedy (or
  sampled with ``do_sample``/``temperature``/``top_p``/``top_k``), up to ``max_gen_toks`` tokens,
  stopping at EOS or at a stop sequence, the text cut before the first stop sequence.

Model arguments (``model_args="package=PKG,batch_size=8,..."``): ``package`` (the folder;
``pretrained`` is an alias, which lm-eval uses to name the results folder),
``batch_size`` (int or ``auto``: ``max_batch_size``, default 16), ``max_batch_tokens`` (tokens per
log-likelihood batch, default 8192: bounds the float32 logits held at once), ``max_length``
(default: the package's context), ``max_gen_toks`` (256), ``add_bos_token`` (False),
``prefix_token_id`` (default BOS), ``device`` (``cpu``/``cuda``), ``threads`` (ONNX Runtime).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from stlm.errors import InvalidArgumentError
from stlm.evaluation.scoring import batches, model_input, score_continuation
from stlm.runtime import Generator, SamplingParams

log = logging.getLogger(__name__)

__all__ = ["StlmLM"]

DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_AUTO_BATCH = 16
DEFAULT_MAX_BATCH_TOKENS = 8192
#: generation kwargs lm-eval tasks use that map onto SamplingParams (others are refused).
_SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")

Request = tuple[Any, list[int], list[int]]


def _bars_off() -> bool:
    """Whether progress bars are off (``TQDM_DISABLE``, set by ``stlm -q``): tqdm reads it only for
    bars created without an explicit ``disable``, and lm-eval passes one."""
    return os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


def _batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    """lm-eval's batch_size (an int, 'N', 'auto' or 'auto:N') as a row count."""
    text = "1" if batch_size is None else str(batch_size)
    if text.startswith("auto"):
        return int(max_batch_size or DEFAULT_AUTO_BATCH)
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidArgumentError(
            f"batch_size={batch_size!r} is invalid: expected an int >= 1 or 'auto'", fix="pass e.g. batch_size=8"
        )
    return value


def _load_generator(package: str | Path, device: str | None, threads: int | None) -> Generator:
    if device not in (None, "cpu", "cuda") and not str(device).startswith("cuda"):
        raise InvalidArgumentError(f"device={device!r} is invalid: expected 'cpu' or 'cuda'", fix="pass device=cpu")
    return Generator.load(package, device="cpu" if device is None else str(device).split(":")[0], threads=threads)


@register_model("stlm")
class StlmLM(TemplateLM):
    """An stlm package as an lm-eval model (see the module docstring for the arguments)."""

    def __init__(
        self,
        package: str | Path | None = None,
        pretrained: str | Path | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        add_bos_token: bool = False,
        prefix_token_id: int | None = None,
        device: str | None = None,
        threads: int | None = None,
        seed: int = 1234,
        generator: Generator | None = None,
    ) -> None:
        """Load ``package`` (or use an already loaded ``generator``)."""
        super().__init__()
        package = package if package is not None else pretrained
        if generator is None:
            if package is None:
                raise InvalidArgumentError(
                    "the stlm model needs a package", fix='pass model_args="package=PATH/TO/PACKAGE"'
                )
            generator = _load_generator(package, device, threads)
        self.generator = generator
        self.package = str(package) if package is not None else "generator"
        context = generator.context_length
        self._max_length = int(max_length) if max_length else context
        if not 1 <= self._max_length <= context:
            raise InvalidArgumentError(
                f"max_length={max_length} is invalid for a package whose context is {context} tokens",
                fix=f"pass max_length between 1 and {context}, or leave it out",
            )
        self._max_gen_toks = int(max_gen_toks)
        self._batch = _batch_size(batch_size, max_batch_size)
        self._max_batch_tokens = int(max_batch_tokens)
        self.add_bos_token = bool(add_bos_token)
        self._prefix = prefix_token_id
        self._seed = int(seed)
        self._bos_text = generator.tokenizer.decode([generator.manifest.generation.bos_token_id], False)

    # -- what lm-eval asks of a model ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        """EOS (``<|endoftext|>``)."""
        return self.generator.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and the first rolling window) is conditioned on: BOS."""
        return self._prefix if self._prefix is not None else self.generator.manifest.generation.bos_token_id

    @property
    def max_length(self) -> int:
        """Tokens the model reads at once (the package's context unless ``max_length`` is given)."""
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        """Default tokens to generate when a task does not say."""
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        """Rows per batch."""
        return self._batch

    @property
    def tokenizer_name(self) -> str:
        """Fingerprint for lm-eval's request cache."""
        return f"stlm:{self.package}"

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in the results' ``config``."""
        m = self.generator.manifest
        return {"stlm_package": self.package, "stlm_kind": m.kind, "stlm_dtype": m.dtype, "stlm_variant": m.variant}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; BOS first only when asked (``add_bos_token``), as HFLM."""
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith(self._bos_text):
            add = False
        ids = self.generator.tokenizer.encode(string)
        return [self.generator.manifest.generation.bos_token_id, *ids] if add else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``tokens``."""
        return self.generator.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # -- log-likelihoods ------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's tokenizing loglikelihood, with its bar off under ``stlm -q`` (TQDM_DISABLE)."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or _bars_off())

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Score tokenized ``(key, context, continuation)`` requests; identical inputs run once."""
        inputs: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            ctx = context or [self.prefix_token_id]  # HFLM asserts a non-empty context
            inputs.setdefault(model_input(ctx, continuation, self.max_length), []).append(i)
        unique = list(inputs)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or _bars_off(), desc="stlm loglikelihood")
        for group in batches([len(u) for u in unique], self.batch_size, self._max_batch_tokens):
            for u, logits in zip(group, self._logits([unique[u] for u in group]), strict=True):
                for i in inputs[unique[u]]:
                    key, _, continuation = requests[i]
                    results[i] = score_continuation(logits, continuation)
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, results[i])
                    bar.update(1)
        bar.close()
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of ``max_length`` tokens (perplexity)."""
        windows: list[Request] = []
        owners: list[int] = []
        for n, (text,) in enumerate(req.args for req in requests):
            for context, target in map(
                make_disjoint_window,
                get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1),
            ):
                windows.append((None, context, target))
                owners.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, scores, strict=True):
            totals[n] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _logits(self, token_ids: list[tuple[int, ...]]) -> list[np.ndarray]:
        """Float32 logits of every position of each sequence (teacher-forced, chunked)."""
        return self.generator.logits([list(t) for t in token_ids])

    # -- generation -------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context until a stop sequence, EOS or ``max_gen_toks`` tokens."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or _bars_off(), desc="stlm generate_until")
        for members in groups.values():
            params, until = self._sampling(requests[members[0]].args[1])
            max_ctx = self.max_length - params.max_new_tokens
            prompts = [self.tok_encode(requests[i].args[0])[-max_ctx:] for i in members]
            for group in batches([len(p) for p in prompts], self.batch_size, 1 << 62):
                seeded = [params if params.greedy else _with_seed(params, self._seed + members[g]) for g in group]
                for g, tokens in zip(group, self._generate([prompts[g] for g in group], seeded), strict=True):
                    text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                    results[members[g]] = text
                    self.cache_hook.add_partial("generate_until", requests[members[g]].args, text)
                    bar.update(1)
        bar.close()
        return results

    def _sampling(self, gen_kwargs: dict[str, Any]) -> tuple[SamplingParams, list[str]]:
        """SamplingParams and stop sequences of a task's generation kwargs (lm-eval's normalisation)."""
        if not isinstance(gen_kwargs, dict):
            raise InvalidArgumentError(f"generation kwargs {gen_kwargs!r} are not a dict", fix="check the task's YAML")
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id], False))
        max_gen = int(kwargs.pop("max_gen_toks"))
        if not 0 < max_gen < self.max_length:
            raise InvalidArgumentError(
                f"max_gen_toks={max_gen} leaves no room for a context in {self.max_length} tokens",
                fix=f"ask for between 1 and {self.max_length - 1} tokens",
            )
        unknown = sorted(set(kwargs) - set(_SAMPLING_KEYS))
        if unknown:
            raise InvalidArgumentError(
                f"generation kwargs {unknown} are not supported by the stlm model",
                fix=f"use only until, max_gen_toks, {', '.join(_SAMPLING_KEYS)}",
            )
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0.0)) > 0
        params = SamplingParams(
            max_new_tokens=max_gen,
            temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_p=float(kwargs.get("top_p", 1.0) or 1.0),
            top_k=int(kwargs.get("top_k", 0) or 0),
            repetition_penalty=float(kwargs.get("repetition_penalty", 1.0)),
            seed=kwargs.get("seed"),
            stop=tuple(s for s in until if s and s != self._bos_text),
        )
        return params, until

    def _generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple[int, ...]]:
        """Generated token ids of each prompt, run as one batch on the package's engine."""
        return [c.token_ids for c in self.generator.complete(prompts, params)]


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    """``params`` with a per-request seed unless the task gave one (reproducible sampling)."""
    return params if params.seed is not None else dataclasses.replace(params, seed=seed)
