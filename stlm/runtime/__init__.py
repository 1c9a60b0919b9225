"""The light runtime services embed: load a package folder once, generate many times.

Never imports torch or transformers. Typical use::

    from stlm.runtime import Generator, SamplingParams

    gen = Generator.load("stablelm-onnx")
    text = gen.generate("The capital of France is", max_new_tokens=16, temperature=0)
    for piece in gen.stream("Once upon a time", SamplingParams(max_new_tokens=64, seed=1)):
        print(piece, end="", flush=True)
"""

from stlm.errors import StlmError
from stlm.runtime.constraints import Constraint
from stlm.runtime.generator import Generator
from stlm.runtime.sampling import SamplingParams
from stlm.runtime.sequence import Completion
from stlm.runtime.tokenizer import Tokenizer

__all__ = ["Completion", "Constraint", "Generator", "SamplingParams", "StlmError", "Tokenizer"]
