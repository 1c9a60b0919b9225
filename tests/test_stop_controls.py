"""vLLM's stop and length controls (SamplingParams), each against its vLLM meaning, on a random model."""

from __future__ import annotations

from pathlib import Path

import pytest

from stlm.errors import InvalidArgumentError
from stlm.runtime import Generator, SamplingParams
from stlm.runtime.sequence import SequenceState

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def gen(package: Path) -> Generator:
    return Generator.load(package, device="cpu", threads=1)


def _greedy(gen: Generator, n: int = 8, **kw: object) -> tuple[str, tuple[int, ...], str]:
    c = gen.complete([PROMPT], SamplingParams(max_new_tokens=n, temperature=0.0, **kw))[0]  # type: ignore[arg-type]
    return c.text, c.token_ids, c.finish_reason


def test_stop_token_ids_finish_with_stop_and_keep_the_token(gen: Generator) -> None:
    _text, ids, _ = _greedy(gen)
    _, cut, reason = _greedy(gen, stop_token_ids=[ids[3]])
    first = ids.index(ids[3])
    assert reason == "stop" and cut == ids[: first + 1]  # vLLM: the stop token is in the output ids
    shown, _, _ = _greedy(gen, stop_token_ids=[ids[3]])
    assert shown == gen.tokenizer.decode(list(ids[:first]))  # ... but not in the text
    kept, _, _ = _greedy(gen, stop_token_ids=[ids[3]], include_stop_str_in_output=True)
    assert kept == gen.tokenizer.decode(list(ids[: first + 1]))


def test_min_tokens_forbids_eos_and_stop_ids_before_it(gen: Generator) -> None:
    _, ids, _ = _greedy(gen)
    _, got, reason = _greedy(gen, stop_token_ids=[ids[0]], min_tokens=3)
    assert got[0] != ids[0] or len(got) >= 3  # the stop id cannot end the output before 3 tokens
    assert len(got) >= 3 or reason == "length"
    # a row whose argmax is EOS: min_tokens makes it go on
    row = _eos_row(gen)
    s = SequenceState([1, 2], SamplingParams(max_new_tokens=4, temperature=0.0, min_tokens=2), gen.tokenizer, 0)
    s.step(row)
    assert not s.finished and s.generated[0] != 0
    s.step(row)
    s.step(row)
    assert s.finish_reason == "eos"


def _eos_row(gen: Generator) -> object:
    import numpy as np

    row = np.zeros(gen.manifest.model.vocab_size, np.float32)
    row[0], row[5] = 10.0, 5.0
    return row


def test_ignore_eos_runs_to_max_tokens(gen: Generator) -> None:
    row = _eos_row(gen)
    s = SequenceState([1], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True), gen.tokenizer, 0)
    for _ in range(3):
        s.step(row)  # type: ignore[arg-type]
    assert s.finish_reason == "length" and s.generated == [0, 0, 0]


def test_full_eos_set_ends_generation(gen: Generator) -> None:
    row = _eos_row(gen)
    row[7] = 20.0  # type: ignore[index]
    s = SequenceState([1], SamplingParams(max_new_tokens=3, temperature=0.0), gen.tokenizer, (0, 7))
    s.step(row)  # type: ignore[arg-type]
    assert s.finish_reason == "eos" and s.generated == []


def test_skip_special_tokens(gen: Generator) -> None:
    row = _eos_row(gen)
    for skip, want in ((True, ""), (False, "<|endoftext|>" * 2)):
        p = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True, skip_special_tokens=skip)
        s = SequenceState([1], p, gen.tokenizer, 0)
        text = s.step(row) + s.step(row)  # type: ignore[arg-type]
        assert text == want and s.completion().text == want


def test_include_stop_str_in_output(gen: Generator) -> None:
    text, _, _ = _greedy(gen)
    stop = text[3:6]
    cut, _, reason = _greedy(gen, stop=[stop])
    kept, _, _ = _greedy(gen, stop=[stop], include_stop_str_in_output=True)
    assert reason == "stop" and cut == text[: text.index(stop)] and kept == cut + stop


def test_min_tokens_defers_stop_strings(gen: Generator) -> None:
    _text, ids, _ = _greedy(gen)
    first = gen.tokenizer.decode([ids[0]])
    stop = first.strip()[:2] or first
    early, _, _ = _greedy(gen, stop=[stop])
    late, got, _ = _greedy(gen, stop=[stop], min_tokens=4)
    assert len(early) < len(first) + 1 and len(got) >= 4 and late.startswith(first)


def test_bad_words_never_appear(gen: Generator) -> None:
    _text, ids, _ = _greedy(gen)
    tok = gen.tokenizer
    # vLLM bans a word as written and, when that is as many tokens, with a leading space
    k, word = next(
        (i, w)
        for i, t in enumerate(ids)
        if (w := tok.decode([t]).strip()) and len(tok.encode(w)) == len(tok.encode(" " + w)) == 1
    )
    _banned, got, _ = _greedy(gen, bad_words=[word])
    assert got[:k] == ids[:k] and got[k] != ids[k]
    assert not {tok.encode(word)[0], tok.encode(" " + word)[0]} & set(got)
    # a two-token word: only its last token is banned, and only right after the first
    pair = tok.decode(list(ids[1:3]))
    _, got2, _ = _greedy(gen, bad_words=[pair]) if len(tok.encode(pair.lstrip())) == 2 else ("", ids, "")
    assert (got2[:2] == ids[:2] and got2[2] != ids[2]) or len(tok.encode(pair.lstrip())) != 2


def test_truncate_prompt_tokens_keeps_the_last_tokens(gen: Generator) -> None:
    long = "one two three four five six seven " * 4
    ids = gen.tokenizer.encode(long)
    tail = gen.tokenizer.decode(ids[-5:])
    a = gen.complete([long], SamplingParams(max_new_tokens=4, temperature=0.0, truncate_prompt_tokens=5))[0]
    b = gen.complete([tail], SamplingParams(max_new_tokens=4, temperature=0.0))[0]
    assert a.prompt_tokens == 5 and a.token_ids == b.token_ids


@pytest.mark.parametrize(
    "bad",
    [
        {"stop_token_ids": [-1]},
        {"stop_token_ids": "0"},
        {"min_tokens": -1},
        {"min_tokens": 100, "max_new_tokens": 4},
        {"ignore_eos": 1},
        {"bad_words": [""]},
        {"truncate_prompt_tokens": 0},
    ],
)
def test_bad_values_name_the_field(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError, match=next(iter(bad))):
        SamplingParams(**bad)  # type: ignore[arg-type]


def test_export_carries_the_eos_list_and_old_manifests_load(checkpoint: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from stlm.export.onnx_export import export_onnx
    from stlm.manifest import read_manifest

    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    (ck / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5, 9]}))
    pkg = export_onnx(ck, tmp_path / "pkg", kv_cache="concat")
    assert read_manifest(pkg).generation.eos_set == (0, 5, 9)
    assert Generator.load(pkg, device="cpu", threads=1).eos_token_ids == (0, 5, 9)
    manifest = json.loads((pkg / "stlm.json").read_text())
    del manifest["generation"]["eos_token_ids"]  # a manifest written before the EOS set
    (pkg / "stlm.json").write_text(json.dumps(manifest))
    assert read_manifest(pkg).generation.eos_set == (0,)
