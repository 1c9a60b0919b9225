"""The ``stlm`` command line: each command parses, calls one library function, prints.

Mistakes (:class:`stlm.errors.StlmError`) are printed without a traceback and exit with status 2.
stdout carries only results (generated text, JSON); logs and progress go to stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from stlm.cli.common import StlmGroup, add_verbosity_and_envvars, configure_logging, dtype_option
from stlm.cli.eval import eval_command
from stlm.cli.output import note, progress
from stlm.cli.quality import perplexity, verify
from stlm.cli.serve import serve
from stlm.errors import StlmError
from stlm.tensorrt.profiles import DEFAULT_MAX_BATCH
from stlm.testing.checkpoint import CONFIG_STYLES, PRESETS


@click.group(cls=StlmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stlm")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """stlm: export StableLM-3B-4E1T to ONNX / TensorRT and generate text with it.

    -v/-q work before or after the command name. Every option can also be set in the environment as
    STLM_<COMMAND>_<OPTION> (e.g. STLM_GENERATE_TOP_P=0.9; `stlm COMMAND --help` names each one).
    """
    configure_logging(ctx)


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Package folder to write.")
@dtype_option("Weight and KV precision.")
@click.option(
    "--revision", default=None, help="With a hub id: the branch, tag or commit to fetch [default: the main branch]."
)
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset.")
@click.option(
    "--target",
    type=click.Choice(["onnxruntime", "tensorrt"]),
    default="onnxruntime",
    show_default=True,
    help="tensorrt: a graph for `stlm build-engine` (concat KV cache, rotary per --rotary).",
)
@click.option(
    "--rotary",
    type=click.Choice(["plugin", "native"]),
    default=None,
    help="With --target tensorrt: plugin (default: stlm::partial_rotary, one fused Triton kernel for "
    "Q and K) or native (ONNX RotaryEmbedding with rotary_embedding_dim, opset 23).",
)
@click.option(
    "--kv-cache",
    type=click.Choice(["inplace", "concat"]),
    default=None,
    help="inplace: preallocated cache updated in place (ONNX Runtime's GroupQueryAttention; the "
    "default for --target onnxruntime); concat: portable ONNX ops (the default for tensorrt).",
)
@click.option(
    "--quantize",
    default=None,
    help="Weight-only quantization of the linear layers (ONNX Runtime MatMulNBits): int8, int4 (blocks of 32; "
    "LM head, first and last layer at 8 bits), int4-rtn, int4-sym, int4-mse, int4-hqq, int4-edge8, each "
    "optionally :key=value,... (method, block, sym, head, edge, acc; see docs/quality.md).",
)
@click.option(
    "--chat-template",
    default=None,
    metavar="FILE",
    help="Jinja chat template to package (replaces the checkpoint's chat_template) [default: the checkpoint's, if any].",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is a package stlm wrote.")
def export(
    model: str,
    output: Path,
    dtype: str,
    revision: str | None,
    opset: int,
    target: str,
    rotary: str | None,
    kv_cache: str | None,
    quantize: str | None,
    chat_template: str | None,
    overwrite: bool,
) -> None:
    """Export MODEL (a checkpoint folder or hub id) to an ONNX package folder."""
    from stlm.export.onnx_export import export_onnx

    note(f"exporting {model} → {output} ({dtype}, opset {opset}, {target})")
    path = export_onnx(
        model,
        output,
        dtype=dtype,
        opset=opset,
        revision=revision,
        overwrite=overwrite,
        progress=progress,
        target=target,
        rotary=rotary,
        kv_cache=kv_cache,
        quantize=quantize,
        chat_template=chat_template,
    )
    click.echo(str(path))


@cli.command("build-engine")
@click.argument("onnx_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Engine folder to write.")
@click.option("--max-batch", default=DEFAULT_MAX_BATCH, show_default=True, type=int, help="Most sequences per call.")
@click.option(
    "--max-seq-len",
    default=None,
    type=int,
    help="Most positions (prompt + generated) per sequence [default: the model's context].",
)
@click.option("--opt-batch", default=None, type=int, help="Batch size kernels are tuned for [default: 1].")
@click.option("--opt-seq-len", default=None, type=int, help="Length kernels are tuned for [default: 512].")
@click.option(
    "--prefill-chunk",
    default=None,
    type=int,
    help="Longest prompt piece run at once; longer prompts run in chunks [default: 1024].",
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path),
    default=None,
    help="Timing cache file: read if present, written after the build (faster rebuilds).",
)
@click.option("--builder-optimization-level", default=3, show_default=True, type=int, help="0 (fast build) .. 5.")
@click.option(
    "--hardware-compat",
    type=click.Choice(["none", "ampere_plus"]),
    default="none",
    show_default=True,
    help="ampere_plus: one engine for every GPU of compute capability ≥ 8.0 (slower kernels).",
)
@click.option("--workspace-gib", default=None, type=float, help="Builder workspace limit [default: TensorRT's].")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is a package stlm wrote.")
def build_engine_command(
    onnx_dir: Path,
    output: Path,
    max_batch: int,
    max_seq_len: int | None,
    opt_batch: int | None,
    opt_seq_len: int | None,
    prefill_chunk: int | None,
    timing_cache: Path | None,
    builder_optimization_level: int,
    hardware_compat: str,
    workspace_gib: float | None,
    overwrite: bool,
) -> None:
    """Build a TensorRT engine package from the ONNX package ONNX_DIR (needs TensorRT and a GPU)."""
    from stlm.export.engine import build_engine

    note(f"building a TensorRT engine {onnx_dir} → {output}")
    path = build_engine(
        onnx_dir,
        output,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        opt_batch=opt_batch,
        opt_seq_len=opt_seq_len,
        prefill_chunk=prefill_chunk,
        timing_cache=timing_cache,
        builder_optimization_level=builder_optimization_level,
        hardware_compat=hardware_compat,
        workspace_gib=workspace_gib,
        overwrite=overwrite,
        progress=progress,
    )
    click.echo(str(path))


def _read_prompt(prompt: str) -> str:
    if prompt != "-":
        return prompt
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StlmError(f"stdin is not UTF-8 text ({exc})", fix="pass the prompt as UTF-8") from None


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", required=True, help="Prompt text, or - to read stdin.")
@click.option("--max-new-tokens", "-n", default=64, show_default=True, type=int)
@click.option("--temperature", "-t", default=1.0, show_default=True, type=float, help="0 means greedy.")
@click.option("--top-k", default=0, show_default=True, type=int, help="0 disables top-k.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--min-p", default=0.0, show_default=True, type=float)
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int, help="Seed for reproducible sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable); not included in the output.")
@click.option("--stream/--no-stream", default=False, help="Print text as it is generated.")
@click.option(
    "--chat", is_flag=True, help="Treat --prompt as a user message and render it with the package's chat template."
)
@click.option("--system", default=None, help="With --chat: a system message before the user's.")
@click.option(
    "--chat-template", default=None, metavar="FILE", help="With --chat: this template instead of the package's."
)
@click.option(
    "--threads", default=None, type=click.IntRange(min=1), help="ONNX Runtime intra-op threads [default: all cores]."
)
def generate(
    package: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
    seed: int | None,
    stop: tuple[str, ...],
    stream: bool,
    chat: bool,
    system: str | None,
    chat_template: str | None,
    threads: int | None,
) -> None:
    """Generate a continuation of --prompt with the package in PACKAGE (printed to stdout).

    With --chat, the reply to --prompt as a user message (the package's chat template, or --chat-template).
    """
    from stlm.runtime import Generator, SamplingParams

    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop),
    )
    if (system is not None or chat_template is not None) and not chat:
        raise StlmError("--system and --chat-template apply to chat prompts", fix="add --chat")
    gen = Generator.load(package, threads=threads)
    text = _read_prompt(prompt)
    if chat:
        from stlm.runtime.chat import chat_prompt

        text = chat_prompt(package, gen, text, system=system, chat_template=chat_template)
    if stream:
        for piece in gen.stream(text, params):
            click.echo(piece, nl=False)
        click.echo()
    else:
        click.echo(gen.generate(text, params))


@cli.command("make-checkpoint")
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Checkpoint folder to write.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="small", show_default=True, help="Model scale.")
@click.option(
    "--tokenizer",
    type=click.Path(path_type=Path),
    default=None,
    help="tokenizer.json to ship (default: a small BPE trained locally).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@dtype_option("Weight storage.")
@click.option(
    "--config-style",
    type=click.Choice(list(CONFIG_STYLES)),
    default="transformers-5",
    show_default=True,
    help="4.38: config.json, shards and tokenizer files as stabilityai/stablelm-3b-4e1t is published.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is a checkpoint make-checkpoint wrote.")
def make_checkpoint(
    out: Path | None,
    output: Path | None,
    preset: str,
    tokenizer: Path | None,
    seed: int,
    dtype: str,
    config_style: str,
    overwrite: bool,
) -> None:
    """Write a random-weight StableLM checkpoint (the embedded default) to -o OUT (numpy only, no torch)."""
    from stlm.testing import write_random_checkpoint

    if (out is None) == (output is None):
        raise StlmError(
            "make-checkpoint needs its folder once: " + ("none was given" if out is None else "OUT and -o both given"),
            fix="stlm make-checkpoint -o OUT",
        )
    folder = output if output is not None else out
    assert folder is not None
    path = write_random_checkpoint(
        folder,
        shape=preset,
        seed=seed,
        tokenizer=tokenizer,
        dtype=dtype,
        config_style=config_style,
        overwrite=overwrite,
    )
    click.echo(str(path))


@cli.command()
@click.option("--workdir", default="stlm-demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--prompt", "-p", default="Once upon a time", show_default=True)
@click.option("--max-new-tokens", "-n", default=48, show_default=True, type=int)
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, help="tokenizer.json for the checkpoint.")
def demo(workdir: Path, prompt: str, max_new_tokens: int, tokenizer: Path | None) -> None:
    """Build a small random StableLM, export it, and stream a generation from it (no download)."""
    from stlm.cli.demo import run_demo

    for piece in run_demo(
        workdir,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        tokenizer=tokenizer,
        progress=progress,
        log=note,
    ):
        click.echo(piece, nl=False)
    click.echo()


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--batch", default=1, show_default=True, type=int)
@click.option("--prompt-len", default=128, show_default=True, type=int)
@click.option("--gen-len", default=64, show_default=True, type=int)
@click.option("--runs", default=3, show_default=True, type=int, help="Measured runs (medians are reported).")
@click.option("--warmup", default=1, show_default=True, type=int)
@click.option("--threads", default=None, type=int, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench(
    package: Path, batch: int, prompt_len: int, gen_len: int, runs: int, warmup: int, threads: int | None, as_json: bool
) -> None:
    """Measure time to first token, prefill/decode speed and per-token latency of PACKAGE."""
    import json

    from stlm.runtime.bench import run_benchmark

    r = run_benchmark(
        package, batch=batch, prompt_len=prompt_len, gen_len=gen_len, runs=runs, warmup=warmup, threads=threads
    )
    click.echo(json.dumps(r.to_dict()) if as_json else r.format())


for _command in (verify, perplexity, serve, eval_command):
    cli.add_command(_command)
add_verbosity_and_envvars(cli)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="stlm")
