"""Rebuild the local lm-eval task data from the held-out Shakespeare corpus (../shared).

    python tests/data/lm_eval_tasks/build_data.py [CORPUS_DIR]

Writes ``stlm_shakespeare_mc.jsonl`` (which line comes next: the true line of a sonnet or three
distractors) and ``stlm_shakespeare_gen.jsonl`` (the next word of a line of The Tempest or
Macbeth) and ``stlm_shakespeare_ppl.jsonl`` (four passages for perplexity). The texts are public domain; the trained tiny model never saw them. Deterministic (seeded).
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = (
    Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2].parent / "shared" / "corpora" / "shakespeare-heldout"
)
MC_ITEMS, GEN_ITEMS, PPL_DOCS = 32, 32, 4


def sonnet_lines(text: str) -> list[list[str]]:
    """The sonnets as lists of verse lines (numbered by Roman numerals in the file)."""
    sonnets, current = [], []
    for raw in text.splitlines():
        line = raw.strip()
        if re.fullmatch(r"[IVXLC]+", line):
            if len(current) >= 12:
                sonnets.append(current)
            current = []
        elif line:
            current.append(line)
    if len(current) >= 12:
        sonnets.append(current)
    return sonnets


def shuffled_words(line: str, rng: random.Random) -> str:
    words = line.split()
    for _ in range(10):
        rng.shuffle(words)
        if " ".join(words) != line:
            break
    return " ".join(words)


def multiple_choice(rng: random.Random) -> list[dict[str, object]]:
    """Two lines of a sonnet, then four candidates for the third: the true one, its words shuffled,
    a line of another sonnet, and the true line with two words swapped with another line's."""
    sonnets = sonnet_lines((CORPUS / "sonnets.txt").read_text(encoding="utf-8"))
    picks = rng.sample(range(len(sonnets)), MC_ITEMS)
    items = []
    for n, s in enumerate(picks):
        lines = sonnets[s]
        i = rng.randrange(2, min(len(lines), 12))
        true = lines[i]
        other = sonnets[rng.choice([k for k in range(len(sonnets)) if k != s])]
        foreign = rng.choice(other[:12])
        words, donor = true.split(), foreign.split()
        for j in rng.sample(range(len(words)), min(2, len(words))):
            words[j] = rng.choice(donor)
        choices = [true, shuffled_words(true, rng), foreign, " ".join(words)]
        order = list(range(4))
        rng.shuffle(order)
        items.append(
            {
                "id": n,
                "context": "\n".join(lines[i - 2 : i]),
                "choices": [choices[k] for k in order],
                "label": order.index(0),
            }
        )
    return items


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) pairs of a play in the Gutenberg layout ("NAME." on its own line)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip().splitlines()
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Z ]+\.", lines[0].strip()):
            out.append((lines[0].strip(), "\n".join(x.rstrip() for x in lines[1:])))
    return out


def generation(rng: random.Random) -> list[dict[str, object]]:
    """A speech of The Tempest or Macbeth cut after a word in one of its lines; the answer is the
    next word (the model generates until the end of the line; a filter keeps the first word)."""
    items = []
    for play in ("tempest.txt", "macbeth.txt"):
        candidates = []
        for who, said in speeches((CORPUS / play).read_text(encoding="utf-8")):
            lines = said.splitlines()
            for n, line in enumerate(lines):
                words = line.split()
                if n >= 1 and len(words) >= 6 and not line.startswith("["):
                    candidates.append((who, lines[max(0, n - 3) : n], words))
        for who, before, words in rng.sample(candidates, GEN_ITEMS // 2):
            k = rng.randrange(3, len(words) - 1)
            answer = re.sub(r"[^A-Za-z']+$", "", re.sub(r"^[^A-Za-z']+", "", words[k]))
            if not re.fullmatch(r"[A-Za-z']+", answer):
                continue
            context = "\n".join([who, *before, " ".join(words[:k])])
            items.append({"id": len(items), "context": context, "answer": answer})
    return items


def documents(rng: random.Random) -> list[dict[str, object]]:
    """Whole passages (a sonnet or a run of speeches) for loglikelihood_rolling (perplexity)."""
    sonnets = sonnet_lines((CORPUS / "sonnets.txt").read_text(encoding="utf-8"))
    picks = [("sonnets", "\n".join(sonnets[i])) for i in rng.sample(range(len(sonnets)), PPL_DOCS // 2)]
    for play in ("tempest.txt", "macbeth.txt"):
        turns = speeches((CORPUS / play).read_text(encoding="utf-8"))
        k = rng.randrange(len(turns) - 8)
        picks.append((play.removesuffix(".txt"), "\n\n".join(f"{who}\n{said}" for who, said in turns[k : k + 8])))
    return [{"id": n, "source": src, "text": text} for n, (src, text) in enumerate(picks)]


def main() -> None:
    rng = random.Random(20240607)
    tasks = {
        "stlm_shakespeare_mc": multiple_choice(rng),
        "stlm_shakespeare_gen": generation(rng),
        "stlm_shakespeare_ppl": documents(rng),
    }
    for name, rows in tasks.items():
        path = HERE / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {path} ({len(rows)} items)")


if __name__ == "__main__":
    main()
