"""The real size: StableLM-3B-4E1T's full architecture (random weights) exported within this machine.

    .venv/bin/python benchmarks/full_size_export.py [--workdir DIR] [--rounds 2] [--gen-len 8]
        [--skip-speed] [--verify] [--keep]

1. Writes a random full-size checkpoint in the published format (bf16 safetensors, ~5.6 GB, in two
   shards; 4.38-style config.json) with numpy, one tensor at a time (no torch model in fp32).
2. Exports it to fp32, fp16 and bf16 (and int4 for the speed run), one at a time, each in its own
   process: wall time and that process's peak RSS (``os.wait4``) per export.
   Targets: fp32 ≤ 14 GB and ≤ 5 min; fp16/bf16 ≤ 8 GB.
3. Decode speed at batch 1 (greedy, short prompt, a few tokens): the fp32 package, transformers
   ``generate`` (fp32, same weights), the int4 and the fp16 package, alternating processes round
   by round (never two models in RAM), medians (the fp16 session's RSS shows that fp16 saves disk,
   not RAM).
4. ``--verify``: ``stlm verify`` of the fp32 package against transformers (saving a reference),
   then fp16/bf16/int4 against that reference.

Needs ~25 GB of free disk in --workdir; everything is written to a new run-* folder in it, deleted at
the end unless --keep (nothing else in --workdir is touched).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_vs_transformers import NEOX, hf_worker  # noqa: E402 - the same transformers timing for both benchmarks

TARGETS = {"fp32": (14.0, 300.0), "fp16": (8.0, None), "bf16": (8.0, None)}  # peak RSS GB, seconds


def run_rss(args: list[str]) -> tuple[float, float, str]:
    """Run ``args``; return (seconds, peak RSS of that one process in GB via ``os.wait4``, stdout)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{err.read()[-3000:]}")
        return seconds, usage.ru_maxrss * 1024 / 1e9, out.read()


def du_gb(path: Path) -> float:
    """Bytes on disk under ``path``, in GB."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e9


def stlm_bench(package: Path, prompt_len: int, gen_len: int) -> dict[str, Any]:
    """``stlm bench --json`` in its own process (1 warm-up, 2 measured runs)."""
    _, rss, out = run_rss(
        [
            sys.executable,
            "-m",
            "stlm",
            "-q",
            "bench",
            str(package),
            "--prompt-len",
            str(prompt_len),
            "--gen-len",
            str(gen_len),
            "--runs",
            "2",
            "--warmup",
            "1",
            "--json",
        ]
    )
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gb"] = rss
    return result


def main() -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "stlm-full-size")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--gen-len", type=int, default=8)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--verify", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and packages")
    p.add_argument("--smoke", action="store_true", help="a scaled-down shape, to try the script in a minute")
    p.add_argument("--worker", choices=["checkpoint", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if a.worker == "checkpoint":
        from stlm.testing import Shape, write_random_checkpoint

        shape = Shape(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=688) if a.smoke else Shape()
        write_random_checkpoint(a.checkpoint, shape=shape, tokenizer=NEOX, dtype="bf16", config_style="4.38")
        return
    if a.worker == "hf":
        print(json.dumps(hf_worker(str(a.checkpoint), a.prompt_len, a.gen_len)))
        return

    me = [sys.executable, str(Path(__file__).resolve())]
    stlm = [sys.executable, "-m", "stlm", "-q"]
    a.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=a.workdir))  # ours alone: the only folder deleted at the end
    print(f"working in {work}", flush=True)
    ckpt = work / "checkpoint"
    rows: list[str] = []
    try:
        secs, rss, _ = run_rss([*me, "--worker", "checkpoint", "--checkpoint", str(ckpt), *(["--smoke"] * a.smoke)])
        rows.append(f"checkpoint (bf16 safetensors)  {secs:7.1f} s  peak RSS {rss:5.2f} GB  disk {du_gb(ckpt):5.2f} GB")
        print(rows[-1], flush=True)
        packages: dict[str, Path] = {}
        for dtype in ("fp32", "fp16", "bf16"):
            out = work / f"pkg-{dtype}"
            secs, rss, _ = run_rss([*stlm, "export", str(ckpt), "-o", str(out), "--dtype", dtype, "--overwrite"])
            rss_max, secs_max = TARGETS[dtype]
            ok = rss <= rss_max and (secs_max is None or secs <= secs_max)
            rows.append(
                f"export {dtype:5} (in-place KV)     {secs:7.1f} s  peak RSS {rss:5.2f} GB  disk "
                f"{du_gb(out):5.2f} GB  target RSS ≤ {rss_max:g} GB"
                + (f", ≤ {secs_max:g} s" if secs_max else "")
                + f"  {'ok' if ok else 'MISSED'}"
            )
            print(rows[-1], flush=True)
            packages[dtype] = out
        if not a.verify:
            shutil.rmtree(packages.pop("bf16"))
        if not a.skip_speed:
            out = work / "pkg-int4"
            secs, rss, _ = run_rss([*stlm, "export", str(ckpt), "-o", str(out), "--quantize", "int4", "--overwrite"])
            rows.append(
                f"export int4 (in-place KV)      {secs:7.1f} s  peak RSS {rss:5.2f} GB  disk {du_gb(out):5.2f} GB"
            )
            print(rows[-1], flush=True)
            packages["int4"] = out
            speed: dict[str, list[dict[str, Any]]] = {"fp32": [], "transformers": [], "int4": [], "fp16": []}
            for r in range(a.rounds):  # alternate so the machine's noise hits both sides alike
                print(f"speed round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
                speed["fp32"].append(stlm_bench(packages["fp32"], a.prompt_len, a.gen_len))
                _, rss, out_hf = run_rss(
                    [
                        *me,
                        "--worker",
                        "hf",
                        "--checkpoint",
                        str(ckpt),
                        "--prompt-len",
                        str(a.prompt_len),
                        "--gen-len",
                        str(a.gen_len),
                    ]
                )
                speed["transformers"].append({**json.loads(out_hf.strip().splitlines()[-1]), "peak_rss_gb": rss})
                speed["int4"].append(stlm_bench(packages["int4"], a.prompt_len, a.gen_len))
                speed["fp16"].append(stlm_bench(packages["fp16"], a.prompt_len, a.gen_len))

            def med(name: str, key: str) -> float:
                return statistics.median(float(x[key]) for x in speed[name])

            hf = med("transformers", "decode_tok_s")
            rows.append(
                f"decode, batch 1, prompt {a.prompt_len}, {a.gen_len} tokens, medians of {a.rounds} alternating rounds:"
            )
            for name in ("transformers", "fp32", "int4", "fp16"):
                tok_s = med(name, "decode_tok_s")
                label = "transformers fp32 generate" if name == "transformers" else f"stlm {name} (ORT CPU)"
                rows.append(
                    f"  {label:28} {tok_s:6.2f} tok/s  {1000 / tok_s:8.0f} ms/token  "
                    f"x{tok_s / hf:4.2f} vs transformers  peak RSS {med(name, 'peak_rss_gb'):5.2f} GB"
                )
        if a.verify:
            ref = work / "reference.json"
            proc = subprocess.run(
                [*stlm, "verify", str(ckpt), str(packages["fp32"]), "--prompts", "2", "--save-reference", str(ref)],
                capture_output=True,
                text=True,
            )
            rows.append(f"verify fp32 vs transformers (exit {proc.returncode}):\n{proc.stdout}")
            for name in ("fp16", "bf16", "int4"):
                if name in packages:
                    proc = subprocess.run(
                        [*stlm, "verify", str(ref), str(packages[name])], capture_output=True, text=True
                    )
                    rows.append(
                        f"verify {name} vs the fp32 package's reference (exit {proc.returncode}):\n{proc.stdout}"
                    )
    finally:
        print("\n" + "\n".join(rows))
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
