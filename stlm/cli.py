"""The ``stlm`` command line: each command parses, calls one library function, prints.

Mistakes (:class:`stlm.errors.StlmError`) are printed without a traceback and exit with status 2.
stdout carries only results (generated text, JSON); logs and progress go to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from stlm.errors import StlmError
from stlm.extras import require_extra
from stlm.serve.config import LOG_LEVELS, LOGPROBS_MODES, ServeConfig


class _StlmFailure(click.ClickException):
    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StlmError as exc:
            raise _StlmFailure(str(exc)) from None


def _progress(stage: str, done: int, total: int) -> None:
    """Progress on stderr (a single updating line when stderr is a terminal)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("quiet"):
        return
    end = "\n" if done >= total or not sys.stderr.isatty() else ""
    click.echo(f"\r  {stage}: {done}/{total}", err=True, nl=False)
    if end:
        click.echo("", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.version_option(package_name="stlm")
def cli(verbose: bool, quiet: bool) -> None:
    """stlm: export StableLM-3B-4E1T to ONNX / TensorRT and generate text with it."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )


@cli.command()
@click.argument("model")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Package folder to write.")
@click.option("--dtype", default="fp32", show_default=True, help="Weight and KV precision: fp32, fp16 or bf16.")
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
    help="Weight-only quantization of the linear layers: int8 or int4 "
    "(ONNX Runtime MatMulNBits, blocks of 32; the LM head stays at 8 bits).",
)
@click.option(
    "--chat-template",
    default=None,
    metavar="FILE",
    help="Jinja chat template to package (replaces the checkpoint's chat_template) [default: the checkpoint's, if any].",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export(
    model: str,
    out: Path,
    dtype: str,
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

    click.echo(f"exporting {model} → {out} ({dtype}, opset {opset}, {target})", err=True)
    path = export_onnx(
        model,
        out,
        dtype=dtype,
        opset=opset,
        overwrite=overwrite,
        progress=_progress,
        target=target,
        rotary=rotary,
        kv_cache=kv_cache,
        quantize=quantize,
        chat_template=chat_template,
    )
    click.echo(str(path))


@cli.command("build-engine")
@click.argument("onnx_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Engine folder to write.")
@click.option("--max-batch", default=4, show_default=True, type=int, help="Most sequences per call.")
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
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def build_engine_command(
    onnx_dir: Path,
    out: Path,
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

    click.echo(f"building a TensorRT engine {onnx_dir} → {out}", err=True)
    path = build_engine(
        onnx_dir,
        out,
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
        progress=_progress,
    )
    click.echo(str(path))


def _read_prompt(prompt: str) -> str:
    return sys.stdin.read() if prompt == "-" else prompt


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
    gen = Generator.load(package)
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


def _api_key(value: str | None) -> str | None:
    """click reads an empty STLM_API_KEY as unset; an empty key must be refused, not ignored."""
    if value is None and os.environ.get("STLM_API_KEY") == "":
        return ""  # ServeConfig refuses it with the message for an empty key
    return value


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--host", default=ServeConfig.host, show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=ServeConfig.port, show_default=True, type=int, help="TCP port (0: any free port).")
@click.option(
    "--api-key",
    default=None,
    envvar="STLM_API_KEY",
    callback=lambda ctx, param, value: _api_key(value),
    help="Require 'Authorization: Bearer KEY' on every route but /health (or set STLM_API_KEY). Without a key "
    "only loopback Host names and application/json bodies are accepted.",
)
@click.option(
    "--max-batch",
    default=ServeConfig.max_batch,
    show_default=True,
    type=int,
    help="Sequences decoded together (cache slots).",
)
@click.option(
    "--max-queue",
    default=ServeConfig.max_queue,
    show_default=True,
    type=int,
    help="Sequences that may wait for a slot; beyond this requests get 429.",
)
@click.option(
    "--max-context",
    default=None,
    type=int,
    help="Tokens per slot (prompt + completion) [default: min(model context, 2048)].",
)
@click.option("--model-name", default=None, help="Model id clients pass [default: the package folder's name].")
@click.option("--threads", default=None, type=int, help="ONNX Runtime intra-op threads [default: ORT's].")
@click.option(
    "--max-connections",
    default=ServeConfig.max_connections,
    show_default=True,
    type=int,
    help="Open connections; past it the one waiting longest for headers is closed (or 503).",
)
@click.option(
    "--header-timeout",
    default=ServeConfig.header_timeout,
    show_default=True,
    type=float,
    help="Seconds a connection has to send a request's headers.",
)
@click.option(
    "--body-timeout",
    default=ServeConfig.body_timeout,
    show_default=True,
    type=float,
    help="Seconds a request has to send its whole body (else 408).",
)
@click.option(
    "--shutdown-timeout",
    default=ServeConfig.shutdown_timeout,
    show_default=True,
    type=float,
    help="After SIGTERM/SIGINT, seconds in-flight requests have to finish before they are cancelled.",
)
@click.option(
    "--replicas",
    default=None,
    type=int,
    help="Serve from N replicas on Ray Serve (each with its own scheduler and KV cache); needs stlm[ray].",
)
@click.option(
    "--autoscale",
    default=None,
    metavar="MIN:MAX",
    help="Ray Serve replicas scaled on load between MIN and MAX (target: --max-batch ongoing requests each).",
)
@click.option(
    "--ray-address",
    default=None,
    help="Ray cluster to join with --replicas/--autoscale (e.g. auto, HOST:6379) [default: the local one, or a new one].",
)
@click.option(
    "--chat-template",
    default=None,
    metavar="FILE",
    help="Jinja chat template for /v1/chat/completions (replaces the package's) [default: the package's, if any].",
)
@click.option(
    "--logprobs-mode",
    type=click.Choice(list(LOGPROBS_MODES)),
    default=ServeConfig.logprobs_mode,
    show_default=True,
    help="Reported log-probabilities: the model's own (raw, OpenAI's definition) or after logit_bias, "
    "penalties and temperature (processed).",
)
@click.option(
    "--log-level",
    type=click.Choice(list(LOG_LEVELS)),
    default=ServeConfig.log_level,
    show_default=True,
    help="Log level of the server (uvicorn and stlm).",
)
@click.option(
    "--access-log/--no-access-log", default=ServeConfig.access_log, show_default=True, help="Log every request."
)
@click.option("--num-cpus", default=None, type=float, help="CPUs reserved per Ray Serve replica [default: 1].")
@click.option("--num-gpus", default=None, type=float, help="GPUs per Ray Serve replica (1: one engine per GPU).")
def serve(
    package: Path,
    replicas: int | None,
    autoscale: str | None,
    ray_address: str | None,
    num_cpus: float | None,
    num_gpus: float | None,
    **options: Any,
) -> None:
    """Serve PACKAGE over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions) with continuous batching.

    With --replicas or --autoscale, the same server runs as replicas on Ray Serve (pip install 'stlm[ray]').
    """
    ray = {
        "replicas": replicas,
        "autoscale": autoscale,
        "ray_address": ray_address,
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
    }
    if any(v is not None for v in ray.values()):
        require_extra("ray", feature="serving on Ray Serve (--replicas/--autoscale)")
        from stlm.serve.ray import run_ray_server

        run_ray_server(package, **ray, **options)
        return
    from stlm.serve import run_server  # needs the serve extra (a clear error without it)

    if run_server(ServeConfig(package, **options)) is not None:
        # stopped by SIGTERM/SIGINT and shut down within --shutdown-timeout: end the process now
        # instead of after the interpreter's teardown (~0.5 s), so that it ends within the deadline
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@cli.command()
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

    from stlm.verify import verify_package

    report = verify_package(reference, package, prompts=prompts, save_reference_to=save_reference)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    sys.exit(0 if report.passed else 1)


@cli.command("make-checkpoint")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--preset",
    default="small",
    show_default=True,
    help="tiny, tiny-hd64, small, medium or stablelm-3b-4e1t (the full architecture).",
)
@click.option(
    "--tokenizer",
    type=click.Path(path_type=Path),
    default=None,
    help="tokenizer.json to ship (default: a small BPE trained locally).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
def make_checkpoint(out: Path, preset: str, tokenizer: Path | None, seed: int, dtype: str) -> None:
    """Write a random-weight StableLM checkpoint (the embedded default) to OUT."""
    from stlm.export.random_checkpoint import make_random_checkpoint

    click.echo(str(make_random_checkpoint(out, preset=preset, seed=seed, tokenizer=tokenizer, dtype=dtype)))


@cli.command()
@click.option("--workdir", default="stlm-demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--prompt", "-p", default="Once upon a time", show_default=True)
@click.option("--max-new-tokens", "-n", default=48, show_default=True, type=int)
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, help="tokenizer.json for the checkpoint.")
def demo(workdir: Path, prompt: str, max_new_tokens: int, tokenizer: Path | None) -> None:
    """Build a small random StableLM, export it, and stream a generation from it (no download)."""
    from stlm.demo import run_demo

    for piece in run_demo(
        workdir,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        tokenizer=tokenizer,
        progress=_progress,
        log=lambda msg: click.echo(msg, err=True),
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
    if as_json:
        click.echo(json.dumps(r.to_dict()))
        return
    click.echo(
        f"{r.backend} {r.dtype} {r.variant.get('kv_cache')} kv, quantization {r.variant.get('quantization')}"
        f" | batch {r.batch}, prompt {r.prompt_len}, generate {r.gen_len}, {r.runs} runs"
    )
    click.echo(f"time to first token  {r.ttft_ms:9.1f} ms   prefill {r.prefill_tok_s:9.1f} tok/s")
    click.echo(
        f"decode               {r.decode_tok_s:9.1f} tok/s  per token p50 {r.token_ms_p50:.2f} "
        f"p90 {r.token_ms_p90:.2f} p99 {r.token_ms_p99:.2f} ms"
    )
    click.echo(f"peak RSS             {r.peak_rss_mb:9.0f} MB")


from stlm.cli_eval import eval_command  # noqa: E402 - the command lives with its options

cli.add_command(eval_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="stlm")
