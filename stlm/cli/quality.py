"""``stlm verify`` and ``stlm perplexity``: is the package still the model? Registered by :mod:`stlm.cli`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from stlm.cli.output import progress


@click.command()
@click.argument("reference")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--prompts", default=4, show_default=True, type=int, help="How many of the fixed prompts to run (1-8).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option(
    "--save-reference",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the package's logits as polygraphy RunResults JSON (only if it passes), to verify an "
    "engine later with `stlm verify FILE ENGINE_DIR`.",
)
def verify(reference: str, package: Path, prompts: int, as_json: bool, save_reference: Path | None) -> None:
    """Compare PACKAGE with REFERENCE: a checkpoint (transformers, fp32) or a --save-reference file.

    Exit status 0 within the tolerance for the package's dtype, 1 beyond it, 2 on errors.
    """
    import json

    from stlm.quality.verify import verify_package

    report = verify_package(reference, package, prompts=prompts, save_reference_to=save_reference)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    sys.exit(0 if report.passed else 1)


@click.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("text_file", type=click.Path(path_type=Path))
@click.option(
    "--ctx",
    default=None,
    type=int,
    help="Tokens per chunk [default: 512, or the --kl-divergence file's]; first half is context only.",
)
@click.option("--chunks", default=None, type=int, help="Score at most this many chunks [default: all].")
@click.option("--batch", default=1, show_default=True, type=int, help="Chunks run together.")
@click.option(
    "--save-logits",
    type=click.Path(path_type=Path),
    default=None,
    help="Save the base logits (the package's, or --reference's) to this .npz for a later --kl-divergence.",
)
@click.option(
    "--kl-divergence",
    type=click.Path(path_type=Path),
    default=None,
    help="Compare with the logits saved by --save-logits: KLD, top-token agreement, Δppl, Δp.",
)
@click.option(
    "--reference",
    default=None,
    help="Compare with a base run beside the package: an stlm package folder (e.g. the fp32 one) or a "
    "checkpoint run by transformers in fp32 (needs the reference extra).",
)
@click.option(
    "--top-k",
    default=None,
    type=int,
    help="Log-probabilities kept per position by --save-logits [default: 1024; 0: all, and the KLD is exact].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def perplexity(
    package: Path,
    text_file: Path,
    ctx: int | None,
    chunks: int | None,
    batch: int,
    save_logits: Path | None,
    kl_divergence: Path | None,
    reference: str | None,
    top_k: int | None,
    as_json: bool,
) -> None:
    """Perplexity of PACKAGE over TEXT_FILE (llama-perplexity's chunks), optionally its KL divergence from a base."""
    import json

    from stlm.quality import run_perplexity

    report = run_perplexity(
        package,
        text_file,
        ctx=ctx,
        chunks=chunks,
        batch=batch,
        save_logits=save_logits,
        kl_divergence=kl_divergence,
        reference=reference,
        top_k=top_k,
        progress=progress,
    )
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
