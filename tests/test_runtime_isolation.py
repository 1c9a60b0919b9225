"""`stlm.runtime` must never load torch or transformers: services embed it without them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import json, sys
import stlm.runtime
from stlm.runtime import Generator
gen = Generator.load(sys.argv[1])
text = gen.generate("Hello world", max_new_tokens=4, temperature=0)
pieces = list(gen.stream("Hello world", max_new_tokens=4, temperature=0))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"heavy": heavy, "text": text, "stream": "".join(pieces)}))
"""


def test_runtime_loads_neither_torch_nor_transformers(package: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(package)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["text"] == result["stream"]
