"""``stlm perplexity``: perplexity of a package over a text, and its KL divergence from a base model.

llama-perplexity's convention: the text is tokenized with the package's tokenizer (no BOS added, as
StableLM's tokenizer does), cut into chunks of ``ctx`` tokens (the tail that does not fill a chunk
is dropped), and each chunk is run on its own from an empty cache. The first half of a chunk
(``ctx // 2`` tokens) is context only; the logits at positions ``ctx // 2 … ctx - 2`` are scored
against the next token, so each chunk scores ``ctx - 1 - ctx // 2`` tokens.

The base of a KL-divergence run is a logits file saved by an earlier run (``--kl-divergence FILE``,
written with ``--save-logits``; :mod:`stlm.quality.logits_file`), or a model run chunk by chunk
beside the package (``--reference``): another stlm package (e.g. the fp32 one), or transformers on a
checkpoint (the only path that imports torch). The numbers: :mod:`stlm.quality.stats`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np

from stlm.errors import InvalidArgumentError
from stlm.package.manifest import MANIFEST_NAME
from stlm.quality import stats
from stlm.quality.logits_file import BaseLogits, check_writable, load_base_logits, save_base_logits
from stlm.quality.report import PerplexityReport
from stlm.quality.stats import BaseRows, PositionScores

if TYPE_CHECKING:
    from stlm.runtime import Generator

DEFAULT_CTX: Final = 512
#: Log-probabilities kept per position by --save-logits (0: all of them).
DEFAULT_TOP_K: Final = 1024
Progress = Callable[[str, int, int], None]
LogitsSource = Callable[[Sequence[Sequence[int]]], list[np.ndarray]]


@dataclass(frozen=True)
class Base:
    """What the package is compared with: saved logits, or a model run beside it (``source``)."""

    name: str
    saved: BaseLogits | None = None
    source: LogitsSource | None = None
    close: Callable[[], None] | None = None


@dataclass
class _Collected:
    """Per-position arrays gathered chunk by chunk."""

    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, **arrays: np.ndarray) -> None:
        for name, array in arrays.items():
            self.parts.setdefault(name, []).append(array)

    def get(self, name: str) -> np.ndarray:
        return np.concatenate(self.parts[name]) if name in self.parts else np.zeros(0)


def make_chunks(tokens: Sequence[int], ctx: int, limit: int | None = None) -> list[list[int]]:
    """The whole chunks of ``ctx`` tokens of ``tokens`` (the first ``limit`` of them)."""
    count = len(tokens) // ctx if limit is None else min(len(tokens) // ctx, limit)
    return [list(tokens[i * ctx : (i + 1) * ctx]) for i in range(count)]


def scored_per_chunk(ctx: int) -> int:
    """Tokens scored in one chunk of ``ctx``."""
    return ctx - 1 - ctx // 2


def score_chunk(logits: np.ndarray, chunk: Sequence[int]) -> tuple[np.ndarray, PositionScores]:
    """The scored rows of a chunk's logits (ctx, vocab) and their :class:`PositionScores`."""
    first = len(chunk) // 2
    rows = np.asarray(logits[first : len(chunk) - 1], dtype=np.float32)
    return rows, stats.score_positions(rows, np.asarray(chunk[first + 1 :]))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgumentError(f"text file {str(path)!r} does not exist", fix="pass a UTF-8 text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(
            f"cannot read {str(path)!r} as UTF-8 text ({type(exc).__name__}: {str(exc)[:120]})",
            fix="pass a UTF-8 text file",
        ) from None


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise InvalidArgumentError(f"{name} is {value!r}; expected an integer ≥ {low}", fix=f"pass {name} ≥ {low}")


def _check_options(kl_divergence: Path | None, reference: Path | None, save: Path | None, top_k: int) -> None:
    if kl_divergence is not None and reference is not None:
        raise InvalidArgumentError(
            "--kl-divergence and --reference both name a base model",
            fix="pass --kl-divergence FILE (saved logits) or --reference PACKAGE_OR_CHECKPOINT, not both",
        )
    if kl_divergence is not None and save is not None:
        raise InvalidArgumentError(
            "--save-logits and --kl-divergence in one run",
            fix="save the base's logits in one run (its package, or --reference), compare in another",
        )
    _at_least("--top-k", top_k, 0)
    if save is not None:
        check_writable(save)


def _check_saved(base: BaseLogits, tokens: Sequence[int], ctx: int | None, vocab: int, path: Path) -> None:
    if ctx is not None and ctx != base.ctx:
        raise InvalidArgumentError(
            f"--ctx {ctx} differs from the --ctx {base.ctx} of {path}", fix=f"pass --ctx {base.ctx}, or omit --ctx"
        )
    if base.vocab != vocab:
        raise InvalidArgumentError(
            f"{path} holds logits over {base.vocab} tokens; this package's vocabulary is {vocab}",
            fix="compare packages of the same model",
        )
    if len(tokens) < base.tokens.size or not np.array_equal(np.asarray(tokens[: base.tokens.size]), base.tokens):
        raise InvalidArgumentError(
            f"the text does not tokenize to the tokens {path} was computed on",
            fix="pass the same text file (and a package with the same tokenizer) as the --save-logits run",
        )


def _package_source(gen: Generator) -> LogitsSource:
    return gen.logits


def _describe(gen: Generator) -> str:
    m = gen.manifest
    parts = [m.kind, m.dtype, f"{m.variant.kv_cache} KV"]
    if m.variant.quantization is not None:
        parts.append(f"{m.variant.quantization.name} {m.variant.quantization.method}")
    return ", ".join(parts)


def _reference(reference: Path) -> Base:
    """``--reference``: an stlm package folder run beside the package, else a checkpoint run by transformers."""
    if (reference / MANIFEST_NAME).is_file():
        from stlm.runtime import Generator

        gen = Generator.load(reference)
        return Base(f"{reference} ({_describe(gen)})", source=_package_source(gen))
    from stlm.quality.reference import transformers_logits

    run, close = transformers_logits(reference)
    return Base(f"transformers fp32 ({reference})", source=run, close=close)


def run_perplexity(
    package: str | Path,
    text_file: str | Path,
    *,
    ctx: int | None = None,
    chunks: int | None = None,
    batch: int = 1,
    save_logits: str | Path | None = None,
    kl_divergence: str | Path | None = None,
    reference: str | Path | None = None,
    top_k: int | None = None,
    progress: Progress | None = None,
) -> PerplexityReport:
    """Perplexity of ``package`` over ``text_file`` (see the module docstring); with ``kl_divergence``
    (a saved logits file) or ``reference`` (a package or checkpoint), its divergence from that base;
    with ``save_logits``, the base's logits (the reference's, else the package's) saved to that file,
    ``top_k`` log-probabilities per position (0: all)."""
    from stlm.runtime import Generator

    top_k = DEFAULT_TOP_K if top_k is None else top_k
    _at_least("--ctx", ctx, 4)
    _at_least("--chunks", chunks, 1)
    _at_least("--batch", batch, 1)
    save = None if save_logits is None else Path(save_logits)
    saved_path = None if kl_divergence is None else Path(kl_divergence)
    _check_options(saved_path, None if reference is None else Path(reference), save, top_k)
    text = _read_text(Path(text_file))
    gen = Generator.load(package)
    tokens = gen.tokenizer.encode(text)
    vocab = gen.manifest.model.vocab_size
    base = None
    if saved_path is not None:
        saved = load_base_logits(saved_path)
        _check_saved(saved, tokens, ctx, vocab, saved_path)
        ctx, chunks = saved.ctx, min(chunks or saved.chunks, saved.chunks)
        base = Base(f"{saved.source} (saved logits {saved_path})", saved=saved)
    pieces = _chunks_of(tokens, ctx or min(DEFAULT_CTX, gen.context_length), chunks, gen.context_length, text_file)
    if reference is not None:
        base = _reference(Path(reference))
    keep = None if save is None else (0 if top_k >= vocab else top_k)
    try:
        got, seconds = _evaluate(pieces, batch, _package_source(gen), base, keep, progress)
    finally:
        if base is not None and base.close is not None:
            base.close()
    saved_to = None
    if save is not None:
        source = base.name if base is not None else f"{package} ({_describe(gen)})"
        saved_to = str(save_base_logits(save, _to_save(got, pieces, vocab, keep or 0, source)))
    return _report(gen, package, text_file, len(tokens), pieces, got, seconds, base, saved_to)


def _chunks_of(tokens: list[int], ctx: int, chunks: int | None, context: int, text_file: str | Path) -> list[list[int]]:
    """The chunks to score, or an error when ``ctx`` exceeds the package's context or the text is too short."""
    if ctx > context:
        raise InvalidArgumentError(
            f"--ctx {ctx} exceeds the package's context of {context} tokens", fix=f"pass --ctx ≤ {context}"
        )
    pieces = make_chunks(tokens, ctx, chunks)
    if not pieces:
        raise InvalidArgumentError(
            f"{text_file} has {len(tokens)} tokens, fewer than one chunk of --ctx {ctx}",
            fix=f"pass a longer text, or a smaller --ctx (≤ {len(tokens)})",
        )
    return pieces


def _evaluate(
    pieces: list[list[int]],
    batch: int,
    source: LogitsSource,
    base: Base | None,
    keep: int | None,
    progress: Progress | None,
) -> tuple[_Collected, float]:
    """Run every chunk and gather per-position arrays; return them and the package's forward seconds.

    ``keep``: with --save-logits, the log-probabilities kept per position (0: all) of the base run
    beside the package (or of the package itself when there is none).
    """
    got, seconds, per = _Collected(), 0.0, scored_per_chunk(len(pieces[0]))
    for start in range(0, len(pieces), batch):
        group = pieces[start : start + batch]
        began = time.perf_counter()
        outputs = source(group)
        seconds += time.perf_counter() - began
        beside = base.source(group) if base is not None and base.source is not None else None
        for i, chunk in enumerate(group):
            rows, scores = score_chunk(outputs[i], chunk)
            got.add(nll=scores.nll)
            if beside is not None:
                base_rows, base_scores = score_chunk(beside[i], chunk)
                _compare(got, rows, scores, stats.base_rows(base_rows, base_scores.lse, 0), base_scores)
                rows, scores = base_rows, base_scores  # what --save-logits keeps
            elif base is not None and base.saved is not None:
                at = slice((start + i) * per, (start + i + 1) * per)
                saved = base.saved
                kept = saved.rows_of(at.start, at.stop)
                _compare(got, rows, scores, kept, PositionScores(saved.nll[at], saved.top1[at], saved.lse[at]))
            if keep is not None:
                _keep(got, rows, scores, keep)
        if progress:
            running = float(np.exp(got.get("nll").mean()))
            progress(f"chunks (PPL so far {running:.4f})", min(start + batch, len(pieces)), len(pieces))
    return got, seconds


def _compare(
    got: _Collected, rows: np.ndarray, scores: PositionScores, base: BaseRows, base_scores: PositionScores
) -> None:
    got.add(
        base_nll=base_scores.nll,
        kld=stats.kl_divergence(base, rows, scores.lse),
        same_top=scores.top1 == base_scores.top1,
        tail=stats.base_tail_mass(base),
    )


def _keep(got: _Collected, rows: np.ndarray, scores: PositionScores, top_k: int) -> None:
    kept = stats.base_rows(rows, scores.lse, top_k)
    got.add(save_nll=scores.nll, save_top1=scores.top1, save_lse=scores.lse, save_logprobs=kept.logprobs)
    if kept.ids is not None:
        got.add(save_ids=kept.ids)


def _to_save(got: _Collected, pieces: list[list[int]], vocab: int, top_k: int, source: str) -> BaseLogits:
    rows = BaseRows(got.get("save_logprobs"), got.get("save_ids") if top_k else None)
    tokens = np.asarray([t for chunk in pieces for t in chunk], dtype=np.int64)
    return BaseLogits(
        len(pieces[0]),
        vocab,
        top_k,
        source,
        tokens,
        got.get("save_nll"),
        got.get("save_top1"),
        got.get("save_lse"),
        rows,
    )


def _report(
    gen: Generator,
    package: str | Path,
    text_file: str | Path,
    text_tokens: int,
    pieces: list[list[int]],
    got: _Collected,
    seconds: float,
    base: Base | None,
    saved_to: str | None,
) -> PerplexityReport:
    nll, ctx = got.get("nll"), len(pieces[0])
    kld = None
    if base is not None:
        kld = stats.summarize_kld(nll, got.get("base_nll"), got.get("kld"), got.get("same_top"), got.get("tail"))
    return PerplexityReport(
        package=str(package),
        description=_describe(gen),
        text=str(text_file),
        ctx=ctx,
        chunks=len(pieces),
        text_tokens=text_tokens,
        scored=int(nll.size),
        ppl=stats.perplexity(nll),
        seconds=seconds,
        tokens_per_second=len(pieces) * ctx / seconds if seconds > 0 else 0.0,
        base=None if base is None else base.name,
        kld=kld,
        saved_logits=saved_to,
    )
