"""The lm-eval adapter (model ``stlm``) against lm-eval's own ``hf`` model on the same checkpoint.

The local tasks in tests/data/lm_eval_tasks (multiple choice, generation, perplexity) run on the
fp32 package (in-place KV, and concat KV on the first items) and on the checkpoint with lm-eval's
``hf`` model (the first 16 items of each task: its CPU run dominates this module's time); every
item's log-likelihoods, greedy flags, generations and metrics must agree. The model is
the trained tiny StableLM in ../shared when it is there (its logits have real margins), else the
random tiny checkpoint of conftest: only the test of the trained model's accuracy needs ../shared.

The ``hf`` reference takes its log-softmax in float64 (HFLM's ``softmax_dtype``): in float32 a
50304-way log-softmax carries ~5e-5 of rounding per token, which over a 10-token continuation
exceeds the 1e-4 this test allows (the adapter takes it in float64).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lm_eval.api.instance import Instance

from stlm.errors import InvalidArgumentError
from stlm.evaluation import ItemResult, StlmLM, evaluate_items, item_results
from stlm.evaluation.run import parse_seeds
from stlm.evaluation.scoring import batches, model_input, score_continuation

ROOT = Path(__file__).resolve().parents[2]
TASK_DIR = ROOT / "tests" / "data" / "lm_eval_tasks"
TASKS = ["stlm_shakespeare_mc", "stlm_shakespeare_gen", "stlm_shakespeare_ppl"]
TRAINED = ROOT.parent / "shared" / "models" / "stablelm-tiny-shakespeare"
MAX_LENGTH = 128  # small, so that the perplexity passages need several rolling windows
REFERENCE_ITEMS = 16  # items per task compared with hf (its CPU run is the slow part of this module)
TOLERANCE = 1e-4

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

Items = dict[str, list[ItemResult]]
#: tokenizer_config.json of the published StableLM-3B-4E1T (conftest's checkpoints ship tokenizer.json
#: only; without it transformers' tokenizer has no BOS/EOS, which lm-eval's hf model needs).
TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "clean_up_tokenization_spaces": True,
    "model_max_length": 4096,
    "tokenizer_class": "GPTNeoXTokenizer",
}


def _published_layout(checkpoint: Path, folder: Path) -> Path:
    """``checkpoint``'s files (linked) plus the published tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        (folder / f.name).symlink_to(f.resolve())
    if not (folder / "tokenizer_config.json").exists():
        (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return folder


@pytest.fixture(scope="module")
def subject(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Checkpoint and its fp32 packages: the trained tiny model if ../shared has it, else a random one."""
    if not TRAINED.is_dir():
        checkpoints, packages = request.getfixturevalue("checkpoints"), request.getfixturevalue("packages")
        return {
            "checkpoint": _published_layout(checkpoints["hd64"], tmp_path_factory.mktemp("eval-random")),
            "packages": {"inplace": packages["hd64-inplace"], "concat": packages["hd64"]},
            "trained": False,
        }
    from stlm.export.onnx_export import export_onnx

    base = tmp_path_factory.mktemp("eval-trained")
    packages = {kv: export_onnx(TRAINED, base / kv, kv_cache=kv) for kv in ("inplace", "concat")}
    return {"checkpoint": TRAINED, "packages": packages, "trained": True}


def _run(model: str, args: str | dict[str, Any], limit: int | None = None) -> tuple[dict[str, Any], Items]:
    return evaluate_items(model, args, TASKS, include_path=[TASK_DIR], batch_size=8, limit=limit)


@pytest.fixture(scope="module")
def hf_reference(subject: dict[str, Any]) -> tuple[dict[str, Any], Items]:
    """lm-eval's hf model on the checkpoint (fp32 weights, float64 log-softmax)."""
    args = {
        "pretrained": str(subject["checkpoint"]),
        "dtype": "float32",
        "softmax_dtype": "float64",
        "device": "cpu",
        "max_length": MAX_LENGTH,
    }
    return _run("hf", args, limit=REFERENCE_ITEMS)


@pytest.fixture(scope="module")
def stlm_inplace(subject: dict[str, Any]) -> tuple[dict[str, Any], Items]:
    """The stlm model on the in-place KV package (the default export): whole tasks for the trained model."""
    limit = None if subject["trained"] else REFERENCE_ITEMS
    return _run("stlm", {"package": str(subject["packages"]["inplace"]), "max_length": MAX_LENGTH}, limit=limit)


def _assert_items_equal(ours: Items, ref: Items) -> float:
    """Per item: same log-likelihoods (within TOLERANCE), greedy flags, generations and metrics."""
    worst = 0.0
    for task in TASKS:
        assert ours[task], task
        for a, b in zip(ours[task], ref[task], strict=False):
            assert a.doc_id == b.doc_id
            assert len(a.loglikelihoods) == len(b.loglikelihoods), (task, a.doc_id)
            if a.loglikelihoods:
                delta = float(np.max(np.abs(np.subtract(a.loglikelihoods, b.loglikelihoods))))
                assert delta <= TOLERANCE, (task, a.doc_id, a.loglikelihoods, b.loglikelihoods)
                worst = max(worst, delta)
            assert a.greedy == b.greedy, (task, a.doc_id)
            assert a.generations == b.generations, (task, a.doc_id)
            if task != "stlm_shakespeare_ppl":  # perplexity metrics hold the float log-likelihood
                assert a.metrics == b.metrics, (task, a.doc_id)
    return worst


def _accuracy(items: list[ItemResult], metric: str) -> float:
    return sum(float(i.metrics[metric]) for i in items) / len(items)


def test_inplace_package_scores_items_as_hf(
    stlm_inplace: tuple[dict[str, Any], Items], hf_reference: tuple[dict[str, Any], Items]
) -> None:
    ours, ref = stlm_inplace[1], hf_reference[1]
    assert [len(ref[t]) for t in TASKS] == [REFERENCE_ITEMS, REFERENCE_ITEMS, 4]
    _assert_items_equal(ours, ref)
    compared = {t: ours[t][: len(ref[t])] for t in TASKS}
    for task, metric in [
        ("stlm_shakespeare_mc", "acc"),
        ("stlm_shakespeare_mc", "acc_norm"),
        ("stlm_shakespeare_gen", "exact_match"),
    ]:
        assert _accuracy(compared[task], metric) == _accuracy(ref[task], metric), (task, metric)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        got = stlm_inplace[0]["results"]["stlm_shakespeare_ppl"][metric]
        assert got == pytest.approx(hf_reference[0]["results"]["stlm_shakespeare_ppl"][metric], rel=1e-5), metric


def test_concat_package_scores_items_as_hf(subject: dict[str, Any], hf_reference: tuple[dict[str, Any], Items]) -> None:
    args = f"package={subject['packages']['concat']},max_length={MAX_LENGTH}"  # lm-eval's string form
    _, items = _run("stlm", args, limit=6)
    assert [len(items[t]) for t in TASKS] == [6, 6, 4]
    _assert_items_equal(items, hf_reference[1])


def test_trained_model_beats_chance(subject: dict[str, Any], stlm_inplace: tuple[dict[str, Any], Items]) -> None:
    if not subject["trained"]:
        pytest.skip("needs ../shared (the trained tiny StableLM), absent from a public clone")
    results = stlm_inplace[0]["results"]
    assert results["stlm_shakespeare_mc"]["acc,none"] >= 0.4  # 4 choices: chance is 0.25
    assert results["stlm_shakespeare_gen"]["exact_match,first_word"] >= 0.1
    assert results["stlm_shakespeare_ppl"]["bits_per_byte,none"] < 3  # uniform over 50304 ids: ~4.3


# -- request-level edge cases against HFLM, on the random tiny model (no ../shared needed) -------------
LONG = "Good boatswain, have care. Where's the master? Play the men. " * 3


def _requests(kind: str, args: list[tuple[Any, ...]]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.mark.parametrize("add_bos_token", [False, True])
def test_truncation_empty_context_and_bos_as_hf(
    checkpoint: Path, packages: dict[str, Path], add_bos_token: bool, tmp_path: Path
) -> None:
    """max_length 16: left truncation of long pairs, rolling windows, truncated generation contexts."""
    from lm_eval.models.huggingface import HFLM

    common = {"max_length": 16, "batch_size": 3, "add_bos_token": add_bos_token}
    hf_checkpoint = _published_layout(checkpoint, tmp_path / "checkpoint")
    hf = HFLM(pretrained=str(hf_checkpoint), dtype="float32", device="cpu", softmax_dtype="float64", **common)
    ours = StlmLM(package=str(packages["hd16-inplace"]), **common)
    pairs = [(LONG, " Heigh, my hearts!"), ("", "Hello world"), ("The cat  ", "sat on the mat"), ("A", "\n")]
    got = ours.loglikelihood(_requests("loglikelihood", pairs))
    want = hf.loglikelihood(_requests("loglikelihood", pairs))
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=TOLERANCE, rtol=0)
    assert [g[1] for g in got] == [w[1] for w in want]
    texts = [(LONG,), ("Hi",), ("",)]
    got_r = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    np.testing.assert_allclose(
        got_r, hf.loglikelihood_rolling(_requests("loglikelihood_rolling", texts)), atol=TOLERANCE
    )
    gens = [
        (LONG, {"until": ["\n"], "max_gen_toks": 5}),
        ("Hello", {"until": ["."], "max_gen_toks": 5}),
        ("Hi", {"max_gen_toks": 4, "do_sample": False}),
    ]
    gen_requests = _requests("generate_until", [(c, dict(k)) for c, k in gens])
    assert ours.generate_until(gen_requests) == hf.generate_until(
        _requests("generate_until", [(c, dict(k)) for c, k in gens])
    )


# -- pure parts ------------------------------------------------------------------------------------------
def test_score_continuation_is_log_softmax_at_the_targets() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 11)).astype(np.float32) * 4
    targets = [int(logits[3].argmax()), 7]
    logprob, greedy = score_continuation(logits, targets)
    x = logits.astype(np.float64)
    log_softmax = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    assert logprob == pytest.approx(log_softmax[3, targets[0]] + log_softmax[4, 7], abs=1e-12)
    assert greedy == (int(logits[4].argmax()) == 7)
    assert score_continuation(logits, [int(logits[4].argmax())])[1] is True
    with pytest.raises(InvalidArgumentError):
        score_continuation(logits, list(range(6)))


def test_model_input_keeps_the_last_max_length_tokens() -> None:
    assert model_input([1, 2, 3], [4, 5], 10) == (1, 2, 3, 4)
    assert model_input([1, 2, 3], [4, 5], 3) == (2, 3, 4)  # (ctx + cont)[-4:][:-1]
    with pytest.raises(InvalidArgumentError):
        model_input([1], [], 4)
    with pytest.raises(InvalidArgumentError):
        model_input([1], [2, 3, 4], 2)


def test_batches_partition_longest_first_within_limits() -> None:
    lengths = [3, 9, 1, 9, 4, 7, 2]
    groups = batches(lengths, batch_size=3, max_tokens=16)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [lengths[i] for g in groups for i in g] == sorted(lengths, reverse=True)
    assert all(len(g) <= 3 and (len(g) == 1 or sum(lengths[i] for i in g) <= 16) for g in groups)


def test_parse_seeds() -> None:
    assert parse_seeds("42") == (42, 42, 42, 42)
    assert parse_seeds("0,1234,None,1234") == (0, 1234, None, 1234)
    for bad in ("x", "1,2", "1,2,3,4,5", ""):
        with pytest.raises(InvalidArgumentError):
            parse_seeds(bad)


def test_bad_model_arguments_are_stlm_errors(packages: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        StlmLM(package=str(packages["hd16-inplace"]), batch_size="zero")
    with pytest.raises(InvalidArgumentError, match="max_length"):
        StlmLM(package=str(packages["hd16-inplace"]), max_length=1 << 20)
    with pytest.raises(InvalidArgumentError, match="package"):
        StlmLM()
    with pytest.raises(InvalidArgumentError, match="samples"):
        item_results({"results": {}})


# -- the command line and the runtime boundary ------------------------------------------------------------
def _stlm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stlm", *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cli_eval_writes_lm_eval_results(packages: dict[str, Path], tmp_path: Path) -> None:
    package = packages["hd16-inplace"]
    out = tmp_path / "results"
    proc = _stlm(
        "eval", str(package), "--tasks", "stlm_shakespeare_mc,stlm_shakespeare_gen", "--include_path", str(TASK_DIR),
        "--limit", "3", "--batch_size", "4", "--num_fewshot", "0", "--seed", "1", "--output_path", str(out),
        "--log_samples", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    files = sorted(out.rglob("results_*.json"))
    assert len(files) == 1 and len(list(out.rglob("samples_*.jsonl"))) == 2
    saved = json.loads(files[0].read_text())
    assert saved["results"] == printed["results"]
    assert saved["config"]["model"] == "stlm" and saved["config"]["stlm_dtype"] == "fp32"
    assert saved["n-samples"]["stlm_shakespeare_mc"]["effective"] == 3
    assert 0.0 <= saved["results"]["stlm_shakespeare_mc"]["acc,none"] <= 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "x"], "--seed"),
        (["--batch_size", "0"], "batch_size"),
        (["--model_args", "max_length=999999"], "max_length"),
        (["--include_path", "/nonexistent"], "include_path"),
    ],
)
def test_cli_eval_mistakes_exit_2(packages: dict[str, Path], args: list[str], message: str) -> None:
    from click.testing import CliRunner

    from stlm.cli import cli

    base = ["eval", str(packages["hd16-inplace"]), "--tasks", "stlm_shakespeare_mc", "--include_path", str(TASK_DIR)]
    result = CliRunner().invoke(cli, [*base, *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and message in result.output and result.exception is not None
    assert isinstance(result.exception, SystemExit)


ISOLATION = """
import json, sys
from lm_eval.api.instance import Instance
from stlm.evaluation import StlmLM
lm = StlmLM(package=sys.argv[1], batch_size=2)
ll = lm.loglikelihood([Instance("loglikelihood", {}, ("Hello", " world"), 0)])
text = lm.generate_until([Instance("generate_until", {}, ("Hello", {"max_gen_toks": 3}), 0)])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") or m.startswith("stlm.export"))
print(json.dumps({"heavy": heavy, "ll": ll[0][0], "text": text[0]}))
"""


def test_adapter_loads_neither_torch_transformers_nor_the_exporter(packages: dict[str, Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", ISOLATION, str(packages["hd16-inplace"])], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [] and result["ll"] < 0
