"""Constrained decoding (stlm.runtime.constraints): outputs checked by jsonschema / re, on a random model."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jsonschema
import pytest

from stlm.errors import InvalidArgumentError
from stlm.runtime import Constraint, Generator, SamplingParams

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
            "required": ["age", "ok"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "tags", "owner"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def gen(package: Path) -> Generator:
    return Generator.load(package, device="cpu", threads=1)


def _sampled(gen: Generator, constraint: Constraint, count: int = 100, max_new_tokens: int = 96) -> list[str]:
    params = [
        SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=s, constraint=constraint)
        for s in range(count)
    ]
    done = gen.complete(["Output:"] * count, params)
    assert [c.finish_reason for c in done] == ["eos"] * count
    return [c.text for c in done]


def test_json_schema_100_of_100_validate(gen: Generator) -> None:
    for text in _sampled(gen, Constraint("json_schema", SCHEMA)):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_and_choice_hold(gen: Generator) -> None:
    pattern = r"[A-Z][a-z]{1,4}-[0-9]{2,3}"
    for text in _sampled(gen, Constraint("regex", pattern), 50, 16):
        assert re.fullmatch(pattern, text), text
    choices = ["red", "green", "blue sky"]
    texts = _sampled(gen, Constraint("choice", choices), 50, 8)
    assert set(texts) <= set(choices)
    assert len(set(texts)) > 1  # sampling explores the choices


def test_json_object_mode_and_grammars(gen: Generator) -> None:
    params = SamplingParams(max_new_tokens=48, temperature=1.0, seed=0, constraint=Constraint("json_object"))
    done = gen.complete(["Output:"] * 10, [dataclasses.replace(params, seed=s) for s in range(10)])
    finished = [c.text for c in done if c.finish_reason == "eos"]  # free-form JSON may run out of tokens
    assert finished and all(isinstance(json.loads(t), dict) for t in finished)
    assert all(c.text.startswith("{") for c in done)
    lark = 'start: "a" x x? "."\nx: "b" | "c"'
    for text in _sampled(gen, Constraint("lark", lark), 10, 24):
        assert re.fullmatch(r"a[bc]{1,2}\.", text), text
    gbnf = 'root ::= "x" [0-9] [0-9]'
    for text in _sampled(gen, Constraint("gbnf", gbnf), 10, 8):
        assert re.fullmatch(r"x[0-9]{2}", text), text


def _classes(text: str) -> str:
    """A regex that ``text`` satisfies, made of character classes (forces no literal)."""
    return "".join(
        "[a-zA-Z]" if c.isascii() and c.isalpha() else "[0-9]" if c.isdigit() else "[ ]" if c == " " else "."
        for c in text
    )


@pytest.mark.parametrize("prompt", ["Once upon a time", "The capital of France is", "x"])
def test_constrained_greedy_equals_unconstrained_when_it_satisfies(gen: Generator, prompt: str) -> None:
    free = gen.complete([prompt], SamplingParams(max_new_tokens=6, temperature=0.0))[0]
    assert free.finish_reason == "length"
    for regex in (_classes(free.text) + "(.|\n)*", "[^\u0000]*"):
        assert re.fullmatch(regex, free.text)
        c = Constraint("regex", regex)
        constrained = gen.complete([prompt], SamplingParams(max_new_tokens=6, temperature=0.0, constraint=c))[0]
        assert constrained.token_ids == free.token_ids and constrained.text == free.text
    # a schema the free text breaks at once gives another output (the mask is really applied)
    c = Constraint("regex", "[0-9]{6}")
    assert gen.complete([prompt], SamplingParams(max_new_tokens=6, temperature=0.0, constraint=c))[0].text.isdigit()


def test_grammar_that_cannot_finish_ends_with_length(gen: Generator) -> None:
    c = Constraint("regex", "a{50}")
    out = gen.complete(["x"], SamplingParams(max_new_tokens=5, temperature=1.0, seed=1, constraint=c))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5 and set(out.text) <= {"a"}


def test_logprobs_and_streaming_under_a_constraint(gen: Generator) -> None:
    c = Constraint("choice", ["yes", "no"])
    raw = gen.complete(["Q:"], SamplingParams(max_new_tokens=4, seed=3, logprobs=True, constraint=c))[0]
    processed = gen.complete(
        ["Q:"], SamplingParams(max_new_tokens=4, seed=3, logprobs=True, logprobs_mode="processed", constraint=c)
    )[0]
    assert raw.token_ids == processed.token_ids and raw.logprobs and processed.logprobs
    # after the mask only the allowed tokens share the mass: each processed logprob >= the raw one
    assert all(p >= r for p, r in zip(processed.logprobs, raw.logprobs, strict=True))
    assert raw.logprobs[0] < -1.0  # the model's own distribution, not the masked one
    pieces = list(gen.stream("Q:", SamplingParams(max_new_tokens=4, seed=3, constraint=c)))
    assert "".join(pieces) == raw.text


def test_bad_schema_is_an_error_naming_the_construct() -> None:
    with pytest.raises(InvalidArgumentError, match="strin"):
        Constraint("json_schema", {"type": "object", "properties": {"a": {"type": "strin"}}})
    with pytest.raises(InvalidArgumentError, match="regex"):
        Constraint("regex", "(")
    with pytest.raises(InvalidArgumentError, match="choice"):
        Constraint("choice", [])
    with pytest.raises(InvalidArgumentError, match="constraint"):
        SamplingParams(constraint="json")  # type: ignore[arg-type]


def test_cli_generate_constraints(package: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from stlm.cli import cli

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    base = ["generate", str(package), "-p", "Output:", "-n", "96", "--seed", "4", "--threads", "1"]
    out = CliRunner().invoke(cli, [*base, "--json-schema", str(schema)])
    assert out.exit_code == 0, out.output
    jsonschema.validate(json.loads(out.stdout), SCHEMA)
    out = CliRunner().invoke(cli, [*base, "--choice", "alpha", "--choice", "beta"])
    assert out.exit_code == 0 and out.stdout.strip() in ("alpha", "beta")
    out = CliRunner().invoke(cli, [*base, "--regex", "[0-9]{4}"])
    assert out.exit_code == 0 and re.fullmatch(r"[0-9]{4}", out.stdout.strip())
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= "ab" [0-9]')
    out = CliRunner().invoke(cli, [*base, "--grammar", str(grammar)])
    assert out.exit_code == 0 and re.fullmatch(r"ab[0-9]", out.stdout.strip())
    out = CliRunner().invoke(cli, [*base, "--regex", "(", "--stream"])
    assert out.exit_code == 2 and "error:" in out.output and "regex" in out.output
    out = CliRunner().invoke(cli, [*base, "--regex", "a", "--choice", "b"])
    assert out.exit_code == 2 and "one" in out.output
    out = CliRunner().invoke(cli, [*base, "-n", "4", "--min-tokens", "4", "--ignore-eos", "--bad-word", "the"])
    assert out.exit_code == 0, out.output
