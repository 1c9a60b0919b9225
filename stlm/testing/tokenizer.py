"""A small byte-level BPE tokenizer trained locally (no download), for checkpoints without one."""

from __future__ import annotations

from pathlib import Path

_CORPUS = """\
The quick brown fox jumps over the lazy dog. StableLM is a decoder-only language model.
def generate(prompt: str, max_new_tokens: int = 32) -> str:
    return model(prompt)[:max_new_tokens]
Once upon a time, in a land far away, there lived a small model that dreamt of being large.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828. Punctuation: ,.;:!?'"()[]{}<>
Café, naïve, résumé, jalapeño, Zürich, smørrebrød. 東京 こんにちは 你好 🙂 🚀
"""


def train_small_tokenizer(path: Path, vocab_size: int = 2000) -> Path:
    """Train a byte-level BPE of ``vocab_size`` tokens (``<|endoftext|>`` = 0) and save it to ``path``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    tok.save(str(path))
    return path
