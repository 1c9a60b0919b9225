"""stlm.runtime.tokenizer.Tokenizer against transformers' GPT-NeoX tokenizer on the real file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import neox_tokenizer

from stlm.errors import InvalidArgumentError, PackageError
from stlm.runtime.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "x  =  1;    y        =          2                          end",
    "tabs\there\t\tand\t\t\tthere",
    "newlines\n\n\nand\r\nwindows\r\n\n",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 rainbow 🏳️‍🌈",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "café naïve résumé Ångström señor e\u0301 (combining) ǅ ﬁ",
    "math ∑∫√∞ ≠ ≤ ≥ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \ufffd replacement",
    " leading space",
    "trailing spaces   ",
    "<|endoftext|>special in text<|padding|>",
    "",
    " ",
    "\u00a0non-breaking\u200bzero-width",
]


@pytest.fixture(scope="module")
def path() -> Path:
    return neox_tokenizer()


@pytest.fixture(scope="module")
def tok(path: Path) -> Tokenizer:
    return Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def hf(path: Path):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    # Built directly from the file, without AutoTokenizer (no hub, no config.json).
    return transformers.GPTNeoXTokenizerFast(tokenizer_file=str(path))


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_matches_transformers(tok: Tokenizer, hf, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode(text)
    assert ids == hf.encode(text)  # transformers' default: no BOS/EOS for GPT-NeoX
    assert ids == hf(text)["input_ids"]
    assert ids == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_decode_matches_transformers(tok: Tokenizer, hf, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = [*tok.encode(text), 0, 1]  # trailing specials: <|endoftext|>, <|padding|>
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(np.array(ids, dtype=np.int64)) == hf.decode(ids, skip_special_tokens=True)


def test_no_bos_is_added(tok: Tokenizer, hf) -> None:  # type: ignore[no-untyped-def]
    assert hf.add_bos_token is False and hf.add_eos_token is False
    assert tok.encode("Hello")[0] != tok.token_to_id("<|endoftext|>")


def test_encode_batch(tok: Tokenizer) -> None:
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    with pytest.raises(InvalidArgumentError, match="single str"):
        tok.encode_batch("one text")


def test_vocab_and_lookup(tok: Tokenizer, hf) -> None:  # type: ignore[no-untyped-def]
    assert tok.vocab_size == len(hf) == 50281
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.token_to_id("Ġthe") == hf.convert_tokens_to_ids("Ġthe")
    assert tok.token_to_id("no-such-token-xyz") is None
    assert tok.id_to_token(0) == "<|endoftext|>"
    assert 0 in tok.special_ids and 1 in tok.special_ids
    assert 50254 not in tok.special_ids  # the whitespace-run added tokens are not special


def test_ids_beyond_the_tokenizer_decode_to_nothing(tok: Tokenizer) -> None:
    # The model's embedding has 50304 rows; the padding ids are not in the tokenizer.
    assert tok.decode([50300]) == ""
    assert tok.decode([tok.encode("a")[0], 50303]) == "a"


@pytest.mark.parametrize("bad", [[-1], [1.5], ["7"], [True]])
def test_decode_rejects_bad_ids(tok: Tokenizer, bad: list[object]) -> None:
    with pytest.raises(InvalidArgumentError, match=repr(bad[0]).strip("'")):
        tok.decode(bad)  # type: ignore[arg-type]


def test_decode_rejects_bad_arrays(tok: Tokenizer) -> None:
    with pytest.raises(InvalidArgumentError, match="-3"):
        tok.decode(np.array([5, -3]))
    with pytest.raises(InvalidArgumentError, match="float"):
        tok.decode(np.array([1.0, 2.0]))


def test_encode_rejects_non_str(tok: Tokenizer) -> None:
    with pytest.raises(InvalidArgumentError, match="bytes"):
        tok.encode(b"hello")  # type: ignore[arg-type]


def test_missing_file_is_a_package_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(PackageError, match="nope") as info:
        Tokenizer.from_file(missing)
    assert info.value.fix


def test_corrupt_file_is_a_package_error(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(PackageError, match=r"tokenizer\.json") as info:
        Tokenizer.from_file(bad)
    assert info.value.fix
