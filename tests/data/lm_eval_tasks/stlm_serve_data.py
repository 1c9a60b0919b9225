"""Data of the small local lm-eval tasks stlm_serve_* (tests of `stlm serve` with lm-eval's own
HTTP clients): written here, no hub, no ../shared. Referenced from the task YAMLs as
``custom_dataset: !function stlm_serve_data.load_...``.
"""

from __future__ import annotations

from typing import Any

FACTS = [
    ("The capital of France is", ["Paris", "Rome", "Berlin", "Madrid"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Fahrenheit", "Kelvin", "Rankine"], 0),
    ("The largest planet in the solar system is", ["Jupiter", "Mars", "Venus", "Mercury"], 0),
    ("A week has seven", ["days", "hours", "months", "years"], 0),
    ("The opposite of hot is", ["cold", "warm", "red", "loud"], 0),
    ("Bees make", ["honey", "milk", "silk", "bread"], 0),
    ("The sun rises in the", ["east", "west", "north", "south"], 0),
    ("Two plus two equals", ["four", "five", "three", "six"], 0),
    ("Shakespeare wrote the play", ["Hamlet", "Faust", "Candide", "Ulysses"], 0),
    ("The chemical symbol for gold is", ["Au", "Ag", "Fe", "Pb"], 0),
]
LINES = [
    ("To be, or not to be, that is the", "question"),
    ("Once upon a", "time"),
    ("The quick brown fox jumps over the lazy", "dog"),
    ("All that glitters is not", "gold"),
    ("A rose by any other name would smell as", "sweet"),
    ("Now is the winter of our", "discontent"),
]
PASSAGES = [
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little.",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with the ends of worms "
    "and an oozy smell, nor yet a dry, bare, sandy hole with nothing in it to sit down on or to eat.",
]


def _dataset(rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mc(**_: Any) -> Any:
    """stlm_serve_mc: which word completes a fact (4 choices; log-likelihoods)."""
    return _dataset([{"context": c, "choices": ch, "label": label} for c, ch, label in FACTS])


def load_gen(**_: Any) -> Any:
    """stlm_serve_gen: the next word of a well-known line (generated until the newline)."""
    return _dataset([{"context": c, "answer": a} for c, a in LINES])


def load_ppl(**_: Any) -> Any:
    """stlm_serve_ppl: passages scored whole (loglikelihood_rolling)."""
    return _dataset([{"text": t} for t in PASSAGES])
