"""Streaming text: IncrementalDetokenizer on the real GPT-NeoX tokenizer, and StopMatcher."""

from __future__ import annotations

import itertools
import random

import pytest
from conftest import neox_tokenizer

from stlm.errors import InvalidArgumentError
from stlm.runtime.detokenize import IncrementalDetokenizer
from stlm.runtime.stops import StopMatcher
from stlm.runtime.tokenizer import Tokenizer

FFFD = "\ufffd"

MULTIBYTE = [
    "中文文本，日本語のテキスト、한국어 텍스트。漢字とかな混じり文",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵🇺🇸 rainbow 🏳️‍🌈 keycap 1️⃣ 🧑🏿‍🚀",
    "café naïve résumé Ångström e\u0301 a\u0308\u0304 Z\u0351\u0352\u0353 combining marks",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 ∑∫√∞≠ 𐍈 gothic, ｆｕｌｌｗｉｄｔｈ, ห้องสมุด, العربية, עברית",
    "mixed: def f(x):\n\treturn '日本' + \"😀\"  # コメント\n\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(neox_tokenizer())


@pytest.fixture(scope="module")
def byte_ids(tok: Tokenizer) -> dict[int, int]:
    """Byte value -> id of its single-byte token (GPT-2 byte-to-unicode map).

    Bytes that never occur in UTF-8 (0xC0, 0xC1, 0xF5-0xFF) have no token.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    ids = {b: tok.token_to_id(table[b]) for b in range(256)}
    assert [b for b, i in ids.items() if i is None] == [0xC0, 0xC1, *range(0xF5, 0x100)]
    return {b: i for b, i in ids.items() if i is not None}


def stream(tok: Tokenizer, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    """Push ids one by one, checking after each push that nothing releasable is held back."""
    detok = IncrementalDetokenizer(tok, prompt)
    pieces: list[str] = []
    for n, token in enumerate(ids, 1):
        pieces.append(detok.push(token))
        out, now = "".join(pieces), tok.decode(ids[:n])
        assert now.startswith(out), "a released piece was revised"
        assert now[len(out) :] in ("", FFFD), f"held back {now[len(out) :]!r}"
        assert len(detok._ids) <= 24, "the decode window must stay short"  # O(1) per token
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", MULTIBYTE, ids=range(len(MULTIBYTE)))
@pytest.mark.parametrize("with_prompt", [False, True])
def test_multibyte_text_streams_cleanly(tok: Tokenizer, text: str, with_prompt: bool) -> None:
    ids = tok.encode(text)
    prompt = tok.encode("Prompt: 日本語 and 😀 ->") if with_prompt else None
    pieces = stream(tok, ids, prompt)
    assert not any(FFFD in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    assert sum(p == "" for p in pieces) > 0  # some tokens really were partial characters


def test_genuine_replacement_characters_come_through(tok: Tokenizer) -> None:
    for text in ["a\ufffdb", "ends with \ufffd", "\ufffd" * 40, "\ufffd\ufffdx\ufffd"]:
        ids = tok.encode(text)
        assert "".join(stream(tok, ids)) == tok.decode(ids) == text


def test_random_bytes_and_tokens(tok: Tokenizer, byte_ids: dict[int, int]) -> None:
    rnd = random.Random(0)
    utf8 = "日本😀é€".encode()
    values = list(byte_ids)
    for _ in range(300):
        kind = rnd.random()
        if kind < 0.4:  # broken UTF-8: random bytes biased towards multi-byte pieces
            data = bytes(
                rnd.choice(utf8) if rnd.random() < 0.7 else rnd.choice(values) for _ in range(rnd.randrange(1, 60))
            )
            ids = [byte_ids[b] for b in data]
        elif kind < 0.7:  # random vocabulary ids, specials and out-of-tokenizer ids included
            ids = [
                rnd.choice([rnd.randrange(50304), rnd.randrange(2), byte_ids[rnd.choice(values)]])
                for _ in range(rnd.randrange(1, 60))
            ]
        else:  # a long run of lone lead bytes / continuation bytes: pending text piles up
            ids = [byte_ids[rnd.choice([0xE4, 0x80, 0xF0])] for _ in range(rnd.randrange(20, 80))]
        prompt = [rnd.randrange(50281) for _ in range(rnd.randrange(0, 6))] or None
        if prompt and tok.decode(prompt).endswith(FFFD):
            prompt = None
        assert "".join(stream(tok, ids, prompt)) == tok.decode(ids)


def test_detokenizer_misuse(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok)
    with pytest.raises(InvalidArgumentError, match=r"1\.5"):
        detok.push(1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="-4"):
        detok.push(-4)
    assert detok.push(tok.encode("hi")[0]) == "hi"
    assert detok.flush() == "" and detok.flush() == ""
    with pytest.raises(RuntimeError, match="flush"):
        detok.push(5)


def test_special_tokens_are_skipped(tok: Tokenizer) -> None:
    ids = [*tok.encode("日本"), 0, *tok.encode(" end"), 1]
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "日本 end"


# --------------------------------------------------------------------------- stop strings


def reference_cut(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the earliest-starting stop occurrence, and whether one was found."""
    starts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(starts)], True) if starts else (text, False)


def run_matcher(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops)
    out: list[str] = []
    for piece in pieces:
        emitted, stopped = matcher.feed(piece)
        out.append(emitted)
        if stopped:
            return "".join(out), True, out
    out.append(matcher.finish())
    return "".join(out), matcher.stopped, out


def splits(text: str) -> list[list[str]]:
    """Every way to cut ``text`` into pieces (text shorter than ~10 chars)."""
    result = []
    for mask in itertools.product([False, True], repeat=max(0, len(text) - 1)):
        pieces, start = [], 0
        for i, cut in enumerate(mask, 1):
            if cut:
                pieces.append(text[start:i])
                start = i
        result.append([*pieces, text[start:]])
    return result


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello world", ("###",), "hello world"),
        ("hello world", (), "hello world"),
        ("STOPafter", ("STOP",), ""),  # stop at the very start
        ("xabcdy", ("abcd", "bc"), "x"),  # overlapping: the earliest start wins
        ("xabcy", ("abcd", "bc"), "xa"),
        ("xabc", ("abcd", "bc"), "xa"),  # the longer stop never completes: cut at "bc"
        ("aab", ("ab", "aab"), ""),
        ("a\nUser: hi", ("User:", "\n"), "a"),
        ("no Use of it", ("User:",), "no Use of it"),
        ("ends with Use", ("User:",), "ends with Use"),
    ],
)
def test_stop_cut_is_independent_of_pieces(text: str, stops: tuple[str, ...], expected: str) -> None:
    assert reference_cut(text, stops)[0] == expected
    for pieces in splits(text) if len(text) <= 12 else [[text], list(text)]:
        assert run_matcher(pieces, stops)[0] == expected, pieces


def test_stop_matcher_random_against_reference() -> None:
    rnd = random.Random(1)
    for _ in range(3000):
        text = "".join(rnd.choice("ab😀c") for _ in range(rnd.randrange(0, 16)))
        stops = tuple(
            "".join(rnd.choice("ab😀c") for _ in range(rnd.randrange(1, 4))) for _ in range(rnd.randrange(1, 4))
        )
        cuts = sorted(rnd.sample(range(1, len(text)), min(len(text) - 1, 4))) if text else []
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        out, stopped, _emitted = run_matcher(pieces, stops)
        assert (out, stopped) == reference_cut(text, stops), (text, stops, pieces)


def test_held_back_text_and_finish() -> None:
    matcher = StopMatcher(("User:",))
    assert matcher.feed("Hello Us") == ("Hello ", False)  # "Us" could start "User:"
    assert matcher.feed("e") == ("", False)
    assert matcher.feed("d it") == ("Used it", False)
    assert matcher.feed(" Use") == (" ", False)
    assert matcher.finish() == "Use" and not matcher.stopped and matcher.matched is None
    pending = StopMatcher(("abcd", "bc"))
    assert pending.feed("abc") == ("", False)  # "bc" is complete, but "abcd" starts earlier
    assert pending.finish() == "a" and pending.stopped and pending.matched == "bc"


def test_after_stop_everything_is_ignored() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("okEN") == ("ok", False)
    assert matcher.feed("Dmore") == ("", True)
    assert matcher.stopped and matcher.matched == "END"
    assert matcher.feed("x") == ("", True) and matcher.finish() == ""


@pytest.mark.parametrize("bad", [("",), ("ok", ""), (3,), None, 5])
def test_invalid_stops_are_rejected(bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match="stop"):
        StopMatcher(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "stops"),
    [
        ("The answer is 42.\n\nUser: and then", ("\n\nUser:",)),
        ("日本語のテキスト。終わり。その後", ("終わり",)),
        ("emoji 👨‍👩‍👧‍👦 family then more", ("👩‍👧",)),  # inside a ZWJ sequence
        ("### start", ("###",)),
        ("no stop here 😀", ("STOP", "😀😀")),
        ("overlap: abcabcd", ("abcd", "cab")),
    ],
)
def test_tokens_to_stopped_text(tok: Tokenizer, text: str, stops: tuple[str, ...]) -> None:
    ids = tok.encode(text)
    detok, matcher = IncrementalDetokenizer(tok), StopMatcher(stops)
    out, stopped = [], False
    for token in ids:
        piece, stopped = matcher.feed(detok.push(token))
        out.append(piece)
        if stopped:
            break
    else:
        piece, stopped = matcher.feed(detok.flush())
        out.append(piece)
        if not stopped:
            out.append(matcher.finish())
            stopped = matcher.stopped
    assert ("".join(out), stopped) == reference_cut(tok.decode(ids), stops)
    assert not any(FFFD in p for p in out)
