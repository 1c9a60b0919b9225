"""``stlm eval``: lm-evaluation-harness on a package (the ``eval`` extra), registered by :mod:`stlm.cli`.

Options keep lm-eval's own names (``--num_fewshot``, ``--batch_size``, ...; the dashed spellings
work too) and mean what they mean for ``lm-eval run --model stlm --model_args package=PACKAGE``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from stlm.cli.output import note


def _names(*names: str) -> list[str]:
    """An option's lm-eval spelling (``--num_fewshot``) and its dashed alias (``--num-fewshot``)."""
    out: list[str] = []
    for n in names:
        out += [n] if "_" not in n else [n, n.replace("_", "-")]
    return out


@click.command("eval")
@click.argument("package", type=click.Path(path_type=Path))
@click.option(*_names("--tasks"), "-t", required=True, multiple=True, help="Task names, comma-separated or repeated.")
@click.option(*_names("--num_fewshot"), "-f", type=int, default=None, help="Few-shot examples per item.")
@click.option(*_names("--limit"), "-L", type=float, default=None, help="Items per task (< 1: a fraction).")
@click.option(*_names("--batch_size"), "-b", default="1", show_default=True, help="Rows per batch, or 'auto'.")
@click.option(*_names("--max_batch_size"), type=int, default=None, help="Rows per batch with --batch_size auto.")
@click.option(*_names("--model_args"), "-M", default="", help="More model arguments: max_length=2048,threads=4,...")
@click.option(*_names("--device"), default=None, help="cpu or cuda (ONNX packages) [default: cpu].")
@click.option(*_names("--include_path"), multiple=True, type=click.Path(path_type=Path), help="Folder of task YAMLs.")
@click.option(
    *_names("--output_path"), "-o", type=click.Path(path_type=Path), default=None, help="Results folder or .json."
)
@click.option(*_names("--log_samples"), "-s", is_flag=True, help="Also write every item's inputs and outputs.")
@click.option(*_names("--gen_kwargs"), default=None, help="Generation arguments for all tasks: temperature=0,top_p=1.")
@click.option(
    *_names("--seed"),
    default="0,1234,None,1234",
    show_default=True,
    help="Seeds of python, numpy, torch and the few-shot sampler (one int sets all four).",
)
@click.option(*_names("--bootstrap_iters"), type=int, default=100000, show_default=True, help="0: no stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
def eval_command(
    package: Path,
    tasks: tuple[str, ...],
    num_fewshot: int | None,
    limit: float | None,
    batch_size: str,
    max_batch_size: int | None,
    model_args: str,
    device: str | None,
    include_path: tuple[Path, ...],
    output_path: Path | None,
    log_samples: bool,
    gen_kwargs: str | None,
    seed: str,
    bootstrap_iters: int,
    as_json: bool,
) -> None:
    """Evaluate PACKAGE with lm-evaluation-harness (the model card's tasks, or your own)."""
    from stlm.support.extras import require_extra

    require_extra("eval", feature="stlm eval")
    from stlm.evaluation import evaluate_package, results_table
    from stlm.evaluation.run import parse_seeds

    results = evaluate_package(
        package,
        [t for item in tasks for t in item.split(",") if t],
        model_args=model_args,
        include_path=include_path,
        num_fewshot=num_fewshot,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        batch_size=batch_size,
        max_batch_size=max_batch_size,
        device=device,
        output_path=output_path,
        log_samples=log_samples,
        gen_kwargs=gen_kwargs,
        seeds=parse_seeds(seed),
        bootstrap_iters=bootstrap_iters,
    )
    results.pop("samples", None)
    if as_json:
        click.echo(json.dumps(results, indent=2, default=str, ensure_ascii=False))
    else:
        click.echo(results_table(results))
    if output_path is not None:
        note(f"results written under {output_path}")
