"""The embedded default end to end: random small checkpoint → ONNX package → streamed text."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from stlm.support.progress import Progress


def run_demo(
    workdir: Path,
    *,
    prompt: str,
    max_new_tokens: int,
    tokenizer: Path | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Iterator[str]:
    """Create ``workdir/checkpoint`` (if absent), export ``workdir/package``, stream a greedy
    continuation of ``prompt`` from it. Yields text pieces."""
    from stlm.export.onnx_export import export_onnx
    from stlm.runtime import Generator, SamplingParams
    from stlm.testing import write_random_checkpoint

    workdir = Path(workdir)
    checkpoint, package = workdir / "checkpoint", workdir / "package"
    if not (checkpoint / "config.json").is_file():
        log(f"writing a random-weight StableLM checkpoint (preset 'small') to {checkpoint}")
        write_random_checkpoint(checkpoint, shape="small", tokenizer=tokenizer)
    log(f"exporting {checkpoint} → {package}")
    export_onnx(checkpoint, package, kv_cache="inplace", overwrite=True, progress=progress)
    log(f"generating {max_new_tokens} tokens from {package} (random weights: expect gibberish)")
    log(f"prompt: {prompt!r}")
    yield from Generator.load(package).stream(prompt, SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
