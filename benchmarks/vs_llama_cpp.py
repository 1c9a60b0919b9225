"""stlm vs llama.cpp on the same checkpoint, side by side: prefill and decode, batch 1 and 8.

    .venv/bin/python benchmarks/vs_llama_cpp.py [--checkpoint DIR | --preset medium] [--rounds 3]
        [--precisions fp32,int8,int4] [--batches 1,8] [--quick] [--check-greedy 32] [--json]

1. llama.cpp comes from a package registry: the `llama-cpp-python` sdist on PyPI vendors it in
   `vendor/llama.cpp` (with `convert_hf_to_gguf.py` and `gguf-py`). It is downloaded with
   `pip download --no-binary :all: --no-deps llama-cpp-python`, extracted and built with cmake
   (`llama-bench`, `llama-batched-bench`, `llama-quantize`, `llama-simple`) in a cache folder
   outside the repository (default ~/.cache/stlm-bench/llama.cpp; --cache-dir), once.
2. The checkpoint (default: `stlm make-checkpoint --preset medium` with the GPT-NeoX tokenizer) is
   converted with llama.cpp's own converter (f32, f16) and quantized with `llama-quantize` (Q8_0,
   Q4_0, Q4_K_M); stlm exports it at the matching precision (`stlm export --dtype/--quantize`).
   The user's checkpoint is only read. Outputs are cached in --workdir, keyed by the checkpoint.
3. Each round runs, per precision and batch, llama.cpp and `stlm bench` back to back in separate
   processes, alternating which goes first, with threads = cores. llama.cpp batch 1 is
   `llama-bench` (pp<P> at depth 0; tg<G> at depth P, as stlm decodes after its P-token prompt);
   batch > 1 is `llama-batched-bench` (B prompts of P tokens, then G steps of B tokens).
   stlm is `stlm bench PKG --json --prompt-len P --gen-len G --batch B --threads T`.
4. Reports per-round ratios (stlm / llama.cpp, > 1 means stlm is faster) and medians, as a
   markdown table (stdout) or one JSON object (--json), with the machine and versions.

Not part of CI. Machines here are shared: read ratios from the same round, and medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NEOX = ROOT.parent / "shared" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
TARGETS = ("llama-bench", "llama-batched-bench", "llama-quantize", "llama-simple")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
log = logging.getLogger("vs_llama_cpp")


class BenchError(Exception):
    """A failure with a message for the user (printed as `error: ...`, exit 2)."""


@dataclasses.dataclass(frozen=True)
class Precision:
    """One side-by-side pair: an stlm export and the matching GGUF type."""

    name: str
    stlm_args: tuple[str, ...]
    stlm_package: str
    gguf_type: str


PRECISIONS = {
    "fp32": Precision("fp32", (), "fp32", "f32"),
    "fp16": Precision("fp16", ("--dtype", "fp16"), "fp16", "f16"),
    "int8": Precision("int8", ("--quantize", "int8"), "int8", "Q8_0"),
    "int4": Precision("int4", ("--quantize", "int4"), "int4", "Q4_0"),
    "int4-q4k": Precision("int4-q4k", ("--quantize", "int4"), "int4", "Q4_K_M"),
}


@dataclasses.dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp: where its sources and binaries are, and what it is."""

    src: Path
    bin: Path
    info: dict[str, Any]

    def tool(self, name: str) -> str:
        """Path of a built binary."""
        return str(self.bin / name)


# ---------------------------------------------------------------- processes


def run(cmd: list[str], what: str, timeout: float = 3600, env: dict[str, str] | None = None) -> str:
    """Run ``cmd``; return stdout; on failure raise BenchError naming ``what`` with the tail of stderr."""
    log.debug("$ %s", " ".join(cmd))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except FileNotFoundError as e:
        raise BenchError(f"{what}: {cmd[0]} not found ({e.strerror}); install it or put it on PATH") from e
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{what}: no result within {timeout:.0f} s (command: {' '.join(cmd)})") from e
    if out.returncode != 0:
        tail = "\n  ".join((out.stderr or out.stdout).strip().splitlines()[-15:])
        raise BenchError(f"{what} failed (exit {out.returncode}): {' '.join(cmd)}\n  {tail}")
    return out.stdout


def stlm_cmd(*args: str) -> list[str]:
    """The stlm CLI of this interpreter, quiet."""
    return [sys.executable, "-m", "stlm", "-q", *args]


def atomic_output(final: Path) -> Path:
    """A temporary sibling of ``final`` to write into and then rename (never a half-written output)."""
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.unlink(missing_ok=True)
    return tmp


# ---------------------------------------------------------------- llama.cpp from PyPI


def obtain_sdist(cache: Path, version: str | None) -> Path:
    """The extracted `llama-cpp-python` sdist in ``cache`` (downloaded from PyPI if not cached)."""
    cache.mkdir(parents=True, exist_ok=True)
    pattern = f"llama_cpp_python-{version}" if version else "llama_cpp_python-*"
    found = sorted(p for p in cache.glob(pattern) if (p / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file())
    if found:
        return found[-1]
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    dl = cache / "sdist"
    log.info("downloading the %s sdist from PyPI (vendors llama.cpp)", spec)
    run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", spec, "-d", str(dl)],
        f"pip download {spec}",
        timeout=1800,
    )
    archives = sorted(dl.glob(f"{pattern}.tar.gz"))
    if not archives:
        raise BenchError(f"pip download {spec} left no {pattern}.tar.gz in {dl}")
    with tarfile.open(archives[-1]) as tar:
        tmp = atomic_output(cache / "extract")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:  # Python < 3.10.12: the sdist comes from PyPI over TLS; member paths are checked by name
            if any(m.name.startswith("/") or ".." in Path(m.name).parts for m in tar.getmembers()):
                raise BenchError(f"{archives[-1]} holds paths outside its folder; refusing to extract it")
            tar.extractall(tmp)
    (top,) = tmp.iterdir()
    top.rename(cache / top.name)
    tmp.rmdir()
    return cache / top.name


def llama_cpp_commit(src: Path, sdist: Path) -> str:
    """The vendored llama.cpp commit: from git if the sdist carries its metadata, else its CHANGELOG."""
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if (
            out.returncode == 0
            and Path(
                subprocess.run(
                    ["git", "-C", str(src), "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=30
                ).stdout.strip()
            )
            == src.resolve()
        ):
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    changelog = (sdist / "CHANGELOG.md").read_text(errors="replace") if (sdist / "CHANGELOG.md").is_file() else ""
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", changelog)
    return m.group(1) if m else "unknown"


def build_llama_cpp(cache: Path, version: str | None, jobs: int) -> LlamaCpp:
    """Obtain and build llama.cpp's tools once per sdist version; later runs reuse the binaries."""
    sdist = obtain_sdist(cache, version)
    src = sdist / "vendor" / "llama.cpp"
    build = src / "build"
    stamp = build / "stlm-build.json"
    if stamp.is_file() and all((build / "bin" / t).is_file() for t in TARGETS):
        info = json.loads(stamp.read_text())
        log.info("llama.cpp %s: reusing the build in %s (built in %.0f s)", info["commit"], build, info["build_s"])
        return LlamaCpp(src, build / "bin", info)
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BenchError(f"building llama.cpp needs {tool} on PATH (Debian: apt-get install cmake g++)")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    log.info("building llama.cpp in %s with %d jobs (minutes)", build, jobs)
    start = time.perf_counter()
    run(["cmake", "-S", str(src), "-B", str(build), *generator, *CMAKE_FLAGS], "cmake configure of llama.cpp")
    run(
        ["cmake", "--build", str(build), "-j", str(jobs), "--target", *TARGETS],
        "cmake build of llama.cpp",
        timeout=7200,
    )
    info = {
        "sdist": sdist.name,
        "commit": llama_cpp_commit(src, sdist),
        "build_s": round(time.perf_counter() - start, 1),
        "cmake_flags": list(CMAKE_FLAGS),
        "compiler": run(["c++", "--version"], "c++ --version").splitlines()[0],
    }
    stamp.write_text(json.dumps(info, indent=2))
    log.info("built llama.cpp %s in %.0f s", info["commit"], info["build_s"])
    return LlamaCpp(src, build / "bin", info)


# ---------------------------------------------------------------- models


def checkpoint_key(checkpoint: Path) -> str:
    """Name of the artifact folder of ``checkpoint``: its name plus a hash of its path, files, sizes, times."""
    h = hashlib.sha256(str(checkpoint.resolve()).encode())
    for f in sorted(checkpoint.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{checkpoint.name}-{h.hexdigest()[:10]}"


def validate_checkpoint(checkpoint: Path) -> None:
    """The files llama.cpp's converter and stlm's exporter both need, with a clear message if absent."""
    config = checkpoint / "config.json"
    if not config.is_file():
        raise BenchError(f"--checkpoint {checkpoint}: no config.json; pass a Hugging Face StableLM checkpoint folder")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "stablelm":
        raise BenchError(f"--checkpoint {checkpoint}: model_type is {model_type!r}, expected 'stablelm'")
    if not (checkpoint / "tokenizer.json").is_file():
        raise BenchError(
            f"--checkpoint {checkpoint}: no tokenizer.json; llama.cpp's converter needs the GPT-NeoX tokenizer "
            "(make-checkpoint --tokenizer .../gpt-neox-20b/tokenizer.json)"
        )
    if not any(checkpoint.glob("*.safetensors")):
        raise BenchError(f"--checkpoint {checkpoint}: no *.safetensors weights")


def make_checkpoint(workdir: Path, preset: str, tokenizer: Path) -> Path:
    """A random-weight checkpoint of ``preset`` with the GPT-NeoX tokenizer (reused if present)."""
    out = workdir / f"checkpoint-{preset}"
    if (out / "config.json").is_file():
        return out
    if not tokenizer.is_file():
        raise BenchError(
            f"--tokenizer {tokenizer} does not exist; llama.cpp's converter only knows real tokenizers: "
            "pass the GPT-NeoX tokenizer.json (or --checkpoint DIR)"
        )
    log.info("building a random '%s' checkpoint in %s", preset, out)
    tmp = atomic_output(out)
    run(stlm_cmd("make-checkpoint", str(tmp), "--preset", preset, "--tokenizer", str(tokenizer)), "make-checkpoint")
    tmp.rename(out)
    return out


def convert_gguf(llama: LlamaCpp, checkpoint: Path, out_dir: Path, gguf_type: str) -> Path:
    """``checkpoint`` as a GGUF of ``gguf_type``: f32/f16 by convert_hf_to_gguf.py, others by llama-quantize."""
    out = out_dir / f"model-{gguf_type}.gguf"
    if out.is_file():
        return out
    tmp = atomic_output(out)
    if gguf_type in ("f32", "f16"):
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise BenchError(f"llama.cpp's converter needs {' and '.join(missing)}: pip install -e '.[export]'")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(llama.src / "gguf-py"), os.environ.get("PYTHONPATH", "")]),
        }
        log.info("converting %s to %s with convert_hf_to_gguf.py", checkpoint, gguf_type)
        cmd = [sys.executable, str(llama.src / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype", gguf_type]
        run([*cmd, "--outfile", str(tmp)], f"convert_hf_to_gguf.py --outtype {gguf_type}", env=env)
    else:
        source = convert_gguf(llama, checkpoint, out_dir, "f32")
        log.info("quantizing to %s with llama-quantize", gguf_type)
        run([llama.tool("llama-quantize"), str(source), str(tmp), gguf_type], f"llama-quantize {gguf_type}")
    tmp.rename(out)
    return out


def export_stlm(checkpoint: Path, out_dir: Path, precision: Precision) -> Path:
    """``checkpoint`` exported by stlm at ``precision`` (reused if present)."""
    out = out_dir / f"stlm-{precision.stlm_package}"
    if (out / "model.onnx").is_file():
        return out
    log.info("exporting %s with stlm (%s)", checkpoint, precision.stlm_package)
    tmp = atomic_output(out)
    run(stlm_cmd("export", str(checkpoint), "-o", str(tmp), *precision.stlm_args), f"stlm export {precision.name}")
    tmp.rename(out)
    return out


# ---------------------------------------------------------------- measurements


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every measurement uses."""

    prompt_len: int
    gen_len: int
    threads: int
    reps: int


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects printed one per line in ``text`` (other lines are skipped)."""
    objs = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                objs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return objs


def llama_bench(llama: LlamaCpp, gguf: Path, s: Settings) -> dict[str, Any]:
    """Batch 1 with llama-bench: pp<P> (depth 0) and tg<G> after a P-token context, tokens/s."""
    base = [llama.tool("llama-bench"), "-m", str(gguf), "-t", str(s.threads), "-r", str(s.reps), "-o", "json"]
    pp = json.loads(run([*base, "-p", str(s.prompt_len), "-n", "0"], "llama-bench (prefill)"))[0]
    tg_cmd = [*base, "-p", "0", "-n", str(s.gen_len), "-d", str(s.prompt_len)]
    tg = json.loads(run(tg_cmd, "llama-bench (decode)"))[0]
    return {
        "prefill_tok_s": pp["avg_ts"],
        "decode_tok_s": tg["avg_ts"],
        "build_commit": pp.get("build_commit"),
        "build_number": pp.get("build_number"),
        "flash_attn": pp.get("flash_attn"),
        "type": pp.get("model_type"),
    }


def llama_batched(llama: LlamaCpp, gguf: Path, s: Settings, batch: int) -> dict[str, Any]:
    """Batch > 1 with llama-batched-bench: ``batch`` prompts of P tokens, then G steps of ``batch`` tokens."""
    cmd = [
        llama.tool("llama-batched-bench"),
        *("-m", str(gguf), "-c", str(batch * (s.prompt_len + s.gen_len)), "-b", "2048", "-ub", "512"),
        *("-npp", str(s.prompt_len), "-ntg", str(s.gen_len), "-npl", str(batch)),
        *("-t", str(s.threads), "-tb", str(s.threads), "--output-format", "jsonl"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    rows = [r for r in json_lines(out.stdout + "\n" + out.stderr) if "speed_tg" in r]
    if out.returncode != 0 or not rows:
        tail = "\n  ".join(out.stderr.strip().splitlines()[-15:])
        raise BenchError(f"llama-batched-bench failed (exit {out.returncode}): {' '.join(cmd)}\n  {tail}")
    return {
        "prefill_tok_s": rows[0]["speed_pp"],
        "decode_tok_s": rows[0]["speed_tg"],
        "flash_attn": rows[0].get("flash_attn"),
    }


def stlm_bench(package: Path, s: Settings, batch: int) -> dict[str, Any]:
    """`stlm bench` of ``package`` (its own process), tokens/s."""
    cmd = stlm_cmd(
        *("bench", str(package), "--json", "--prompt-len", str(s.prompt_len), "--gen-len", str(s.gen_len)),
        *("--batch", str(batch), "--threads", str(s.threads), "--runs", str(s.reps), "--warmup", "1"),
    )
    rows = json_lines(run(cmd, f"stlm bench {package.name} batch {batch}"))
    if not rows:
        raise BenchError(f"stlm bench printed no JSON: {' '.join(cmd)}")
    r = rows[-1]
    return {"prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"], "ttft_ms": r["ttft_ms"]}


@dataclasses.dataclass
class Cell:
    """One precision at one batch size: the per-round measurements of both sides."""

    precision: str
    gguf_type: str
    batch: int
    stlm: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    llama: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    load: list[float] = dataclasses.field(default_factory=list)  # 1-minute load average before each round

    def ratios(self, key: str) -> list[float]:
        """stlm / llama.cpp per round (> 1: stlm faster)."""
        return [a[key] / b[key] for a, b in zip(self.stlm, self.llama, strict=True)]

    def summary(self) -> dict[str, Any]:
        """Medians and per-round ratios, JSON-ready."""
        out: dict[str, Any] = {"precision": self.precision, "gguf_type": self.gguf_type, "batch": self.batch}
        out["load_avg_per_round"] = [round(x, 2) for x in self.load]
        for key in ("prefill_tok_s", "decode_tok_s"):
            ratios = self.ratios(key)
            out[key] = {
                "stlm_median": statistics.median(r[key] for r in self.stlm),
                "llama_cpp_median": statistics.median(r[key] for r in self.llama),
                "ratio_median": statistics.median(ratios),
                "ratios_per_round": [round(r, 3) for r in ratios],
                "stlm_per_round": [round(r[key], 2) for r in self.stlm],
                "llama_cpp_per_round": [round(r[key], 2) for r in self.llama],
            }
        return out


def measure(
    llama: LlamaCpp, models: dict[str, tuple[Path, Path]], batches: list[int], rounds: int, s: Settings
) -> Iterator[tuple[int, list[Cell]]]:
    """``rounds`` rounds; in each, every (precision, batch) runs both sides back to back, the first side
    alternating. Yields (rounds done, cells) after each round."""
    cells = [Cell(name, PRECISIONS[name].gguf_type, batch) for name in models for batch in batches]
    for r in range(rounds):
        for cell in cells:
            package, gguf = models[cell.precision]
            log.info("round %d/%d: %s vs %s, batch %d", r + 1, rounds, cell.precision, cell.gguf_type, cell.batch)

            def run_llama(cell: Cell = cell, gguf: Path = gguf) -> None:
                if cell.batch == 1:
                    cell.llama.append(llama_bench(llama, gguf, s))
                else:
                    cell.llama.append(llama_batched(llama, gguf, s, cell.batch))

            def run_stlm(cell: Cell = cell, package: Path = package) -> None:
                cell.stlm.append(stlm_bench(package, s, cell.batch))

            cell.load.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
            for side in (run_llama, run_stlm) if r % 2 == 0 else (run_stlm, run_llama):
                side()
        yield r + 1, cells


# ---------------------------------------------------------------- greedy agreement


def check_greedy(llama: LlamaCpp, tokenizer: Path, gguf: Path, package: Path, prompt: str, n: int) -> dict[str, Any]:
    """Greedy continuations of ``prompt`` by llama.cpp (llama-simple, f32) and stlm (fp32): leading tokens that agree."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    printed = run([llama.tool("llama-simple"), "-m", str(gguf), "-n", str(n), prompt], "llama-simple")
    if not printed.startswith(prompt):
        raise BenchError(f"llama-simple did not echo the prompt {prompt!r}; got {printed[:80]!r}")
    theirs = printed[len(prompt) :].rstrip("\n")
    ours = run(
        stlm_cmd("generate", str(package), "-p", prompt, "-n", str(n), "-t", "0", "--no-stream"), "stlm generate"
    )
    ours = ours.rstrip("\n")
    a, b = tok.encode(ours).ids, tok.encode(theirs).ids
    agree = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return {
        "prompt": prompt,
        "tokens_compared": min(len(a), len(b)),
        "leading_tokens_agree": agree,
        "identical_text": ours == theirs,
        "stlm": ours,
        "llama_cpp": theirs,
    }


# ---------------------------------------------------------------- report


def versions(llama: LlamaCpp) -> dict[str, Any]:
    """Machine and software versions for the record."""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    return {
        "cpu": cpu,
        "cores": cores(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "stlm": version("stlm"),
        "onnxruntime": version("onnxruntime"),
        "numpy": version("numpy"),
        "llama_cpp": llama.info,
    }


def fmt_cell(d: dict[str, Any]) -> tuple[str, str, str]:
    """(stlm median, llama.cpp median, 'ratio median (per round...)') for the markdown table."""
    rounds = ", ".join(f"{r:.2f}" for r in d["ratios_per_round"])
    return f"{d['stlm_median']:.1f}", f"{d['llama_cpp_median']:.1f}", f"**{d['ratio_median']:.2f}** ({rounds})"


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table plus its settings and versions."""
    s, v = report["settings"], report["versions"]
    p, g = s["prompt_len"], s["gen_len"]
    lines = [
        f"stlm vs llama.cpp — tokens/s, medians of {s['rounds']} rounds; ratio = stlm / llama.cpp "
        f"(> 1: stlm faster), per-round ratios in brackets. Prefill: {p}-token prompt; decode: {g} tokens "
        f"after it; {s['threads']} thread(s).",
        "",
        "| stlm / llama.cpp | batch | prefill stlm | prefill llama.cpp | prefill ratio | decode stlm "
        "| decode llama.cpp | decode ratio |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for c in report["results"]:
        pre, dec = fmt_cell(c["prefill_tok_s"]), fmt_cell(c["decode_tok_s"])
        lines.append(f"| {c['precision']} / {c['gguf_type']} | {c['batch']} | {' | '.join(pre)} | {' | '.join(dec)} |")
    ll = v["llama_cpp"]
    loads = [x for c in report["results"] for x in c["load_avg_per_round"]] or [float("nan")]
    lines += [
        "",
        f"Machine: {v['cpu']}, {v['cores']} cores, {v['os']}. stlm {v['stlm']}, onnxruntime {v['onnxruntime']}, "
        f"llama.cpp {ll['commit'][:9]} (PyPI sdist {ll['sdist']}, {ll['compiler']}, built in {ll['build_s']:.0f} s).",
        f"Checkpoint: {report['checkpoint']}. 1-minute load average before each pair: "
        f"{min(loads):.1f}–{max(loads):.1f} (on {v['cores']} cores).",
    ]
    if "greedy_check" in report:
        gc = report["greedy_check"]
        lines.append(
            f"Greedy check (llama.cpp f32 vs stlm fp32, prompt {gc['prompt']!r}): {gc['leading_tokens_agree']} of "
            f"{gc['tokens_compared']} leading tokens agree; identical text: {gc['identical_text']}."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; --quick sets tiny sizes unless they are given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="StableLM checkpoint folder (default: a random --preset one)")
    p.add_argument("--preset", default=None, help="make-checkpoint preset (default: medium; small with --quick)")
    p.add_argument("--tokenizer", type=Path, default=NEOX, help="tokenizer.json for a built checkpoint (GPT-NeoX)")
    p.add_argument("--rounds", type=int, default=None, help="A/B rounds (default 3; 1 with --quick)")
    p.add_argument("--precisions", default="fp32,int8,int4", help=f"comma list of {', '.join(PRECISIONS)}, or all")
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    p.add_argument("--prompt-len", type=int, default=None, help="default 512 (32 with --quick)")
    p.add_argument("--gen-len", type=int, default=None, help="default 128 (16 with --quick)")
    p.add_argument("--reps", type=int, default=None, help="runs per measurement (default 3; 1 with --quick)")
    p.add_argument(
        "--threads", type=int, default=None, help="default: all cores (1 is steadier on a shared, busy machine)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: small checkpoint, short prompt, 1 round")
    p.add_argument("--check-greedy", type=int, default=0, metavar="N", help="compare N greedy tokens (f32 vs fp32)")
    p.add_argument("--check-prompt", default="ROMEO:\nBut soft, what light through yonder window breaks?\n")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "stlm-vs-llama-cpp")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "stlm-bench" / "llama.cpp")
    p.add_argument("--llama-cpp-python", default=None, metavar="VERSION", help="sdist version (default: cached/newest)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the markdown table")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    q = a.quick
    a.preset = a.preset or ("small" if q else "medium")
    a.rounds = a.rounds if a.rounds is not None else (1 if q else 3)
    a.prompt_len = a.prompt_len or (32 if q else 512)
    a.gen_len = a.gen_len or (16 if q else 128)
    a.reps = a.reps or (1 if q else 3)
    names = list(PRECISIONS) if a.precisions == "all" else [x.strip() for x in a.precisions.split(",") if x.strip()]
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown or not names:
        p.error(f"--precisions {a.precisions!r}: expected a comma list of {', '.join(PRECISIONS)} (or all)")
    a.precisions = names
    try:
        a.batches = [int(x) for x in a.batches.split(",")]
    except ValueError:
        p.error(f"--batches {a.batches!r}: expected a comma list of integers such as 1,8")
    for name in ("rounds", "prompt_len", "gen_len", "reps", "threads", "check_greedy"):
        value, low = getattr(a, name), 0 if name == "check_greedy" else 1
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} {value}: expected an integer ≥ {low}")
    if any(b < 1 for b in a.batches):
        p.error(f"--batches {a.batches}: expected batch sizes ≥ 1")
    return a


def prepare(a: argparse.Namespace, threads: int) -> tuple[LlamaCpp, Path, Path]:
    """Check the checkpoint (before any long build), build llama.cpp, make the checkpoint if none was given."""
    if a.checkpoint is not None:
        validate_checkpoint(a.checkpoint)
    elif not a.tokenizer.is_file():
        raise BenchError(
            f"--tokenizer {a.tokenizer} does not exist; llama.cpp's converter only knows real tokenizers: "
            "pass the GPT-NeoX tokenizer.json (or --checkpoint DIR)"
        )
    llama = build_llama_cpp(a.cache_dir.expanduser(), a.llama_cpp_python, threads)
    a.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = a.checkpoint or make_checkpoint(a.workdir, a.preset, a.tokenizer)
    validate_checkpoint(checkpoint)
    out_dir = a.workdir / checkpoint_key(checkpoint)
    out_dir.mkdir(exist_ok=True)
    return llama, checkpoint, out_dir


def bench_all(a: argparse.Namespace) -> dict[str, Any]:
    """Build, convert, export, optionally check greedy agreement, measure: the report."""
    threads = a.threads or cores()
    llama, checkpoint, out_dir = prepare(a, threads)
    models = {
        n: (
            export_stlm(checkpoint, out_dir, PRECISIONS[n]),
            convert_gguf(llama, checkpoint, out_dir, PRECISIONS[n].gguf_type),
        )
        for n in a.precisions
    }
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "versions": versions(llama)}
    if a.check_greedy:
        fp32 = export_stlm(checkpoint, out_dir, PRECISIONS["fp32"])
        f32 = convert_gguf(llama, checkpoint, out_dir, "f32")
        tokenizer = checkpoint / "tokenizer.json"
        report["greedy_check"] = check_greedy(llama, tokenizer, f32, fp32, a.check_prompt, a.check_greedy)
    s = Settings(a.prompt_len, a.gen_len, threads, a.reps)
    saved = a.workdir / "last-report.json"
    for done, cells in measure(llama, models, a.batches, a.rounds, s):  # saved after every round
        report["settings"] = {**dataclasses.asdict(s), "rounds": done, "batches": a.batches}
        report["results"] = [c.summary() for c in cells]
        tmp = atomic_output(saved)
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(saved)
        log.info("report of %d round(s) saved to %s", done, saved)
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point: the markdown table (or JSON) on stdout; `error: ...` and exit 2 on a failure."""
    a = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        report = bench_all(a)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(report, indent=2) if a.json else markdown(report))
    return 0


def cores() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
