"""The embedded default: a random-weight StableLM checkpoint at a chosen scale, written locally.

Built with transformers' own ``StableLmForCausalLM.save_pretrained``, so the folder has exactly
the layout of a real checkpoint (config.json, model.safetensors) plus a tokenizer.json: either
one given by path, or a small byte-level BPE trained here with ``tokenizers`` (no download).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from stlm.errors import InvalidArgumentError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """A scaled StableLM-3B-4E1T shape (same rotary factor, LayerNorm with bias, SwiGLU)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 4096


PRESETS: dict[str, Preset] = {
    # vocab: the tokenizer's size rounded up to 64 (50304 with the GPT-NeoX tokenizer)
    "tiny": Preset(64, 2, 4, 172),  # head dim 16, rotary dim 4
    "tiny-hd64": Preset(128, 2, 2, 344),  # head dim 64, rotary dim 16
    "small": Preset(256, 4, 4, 688),  # head dim 64, rotary dim 16
    "medium": Preset(1024, 8, 16, 2752),  # head dim 64, rotary dim 16
    "stablelm-3b-4e1t": Preset(2560, 32, 32, 6912),  # the real architecture, head dim 80
}

_CORPUS = """\
The quick brown fox jumps over the lazy dog. StableLM is a decoder-only language model.
def generate(prompt: str, max_new_tokens: int = 32) -> str:
    return model(prompt)[:max_new_tokens]
Once upon a time, in a land far away, there lived a small model that dreamt of being large.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828. Punctuation: ,.;:!?'"()[]{}<>
Café, naïve, résumé, jalapeño, Zürich, smørrebrød. 東京 こんにちは 你好 🙂 🚀
"""


def _train_tokenizer(path: Path, vocab_size: int = 2000) -> None:
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


def make_random_checkpoint(
    out: Path, *, preset: str = "small", seed: int = 0, tokenizer: Path | None = None, dtype: str = "float32"
) -> Path:
    """Write a random-weight StableLM checkpoint of ``preset`` scale to ``out`` and return it.

    ``dtype`` is the safetensors storage type ('float32' or 'bfloat16', as published).
    """
    if preset not in PRESETS:
        raise InvalidArgumentError(
            f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}", fix="pass --preset " + "|".join(PRESETS)
        )
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise InvalidArgumentError(
            f"tokenizer file {str(tokenizer)!r} does not exist",
            fix="pass the path of a tokenizer.json, or omit it to train a small one",
        )
    import torch
    from tokenizers import Tokenizer
    from transformers import StableLmConfig, StableLmForCausalLM
    from transformers.utils import logging as hf_logging

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    else:
        _train_tokenizer(out / "tokenizer.json")
    # Like the real model: the embedding is the tokenizer's size padded to a multiple of 64
    # (50277 → 50304 for GPT-NeoX).
    vocab = -(-Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() // 64) * 64
    p = PRESETS[preset]
    config = StableLmConfig(
        vocab_size=vocab,
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_heads,
        intermediate_size=p.intermediate_size,
        max_position_embeddings=p.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        layer_norm_eps=1e-5,
        use_qkv_bias=False,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    config.architectures = ["StableLmForCausalLM"]
    torch.manual_seed(seed)
    model = StableLmForCausalLM(config).to(getattr(torch, dtype)).eval()
    hf_logging.disable_progress_bar()
    model.save_pretrained(out)
    log.info(
        "wrote random %s checkpoint (%d parameters) to %s", preset, sum(t.numel() for t in model.parameters()), out
    )
    return out
