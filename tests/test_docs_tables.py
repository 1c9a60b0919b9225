"""The docs' tables and help texts that restate the code are checked against it (issue #25, item 3):
docs/verify.md's tolerances, docs/quality.md's presets, docs/quantization.md's manifest fields,
docs/serving.md's probe bodies (against a running server) and ``serve --help``'s open routes."""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.request
from pathlib import Path

from click.testing import CliRunner

from stlm.cli import cli
from stlm.serve import BackgroundServer, ServeConfig, load_service
from stlm.serve.guard import GuardPolicy
from stlm.tolerance import ACCURACY_CLASSES, TOLERANCES
from stlm.variant import QUANTIZE_PRESETS, Quantization

DOCS = Path(__file__).resolve().parents[1] / "docs"


def table(doc: str, header: str) -> list[list[str]]:
    """The rows (cells stripped, separator skipped) of the markdown table of ``doc`` whose header starts with
    ``header``."""
    lines = (DOCS / doc).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_verify_doc_tolerances_are_the_code_s() -> None:
    rows = {r[0]: r for r in table("verify.md", "| class | logits rtol")}
    assert list(rows) == list(ACCURACY_CLASSES)
    for name, (_, rtol, top1, greedy, _basis) in rows.items():
        t = TOLERANCES[name]
        assert (float(rtol), float(top1), float(greedy)) == (t.logits_rtol, t.min_top1, t.min_greedy), name
    assert {TOLERANCES[c].logits_atol for c in ACCURACY_CLASSES} == {0.001}  # "(atol 0.001 for all.)"


def test_quality_doc_presets_are_the_code_s() -> None:
    rows = {r[0].split()[0].strip("`"): r for r in table("quality.md", "| preset | method")}
    assert sorted(rows) == sorted(QUANTIZE_PRESETS)
    for name, (_, method, bits, block, zero, head, edge) in rows.items():
        q = QUANTIZE_PRESETS[name]
        assert (method, int(bits), int(block), int(head)) == (q.method, q.bits, q.block_size, q.lm_head_bits), name
        assert int(edge) == (q.edge_bits or q.bits), name
        assert zero.startswith("symmetric") == q.symmetric, name


def test_quantization_doc_names_every_manifest_field() -> None:
    text = (DOCS / "quantization.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(Quantization):
        assert f"`{f.name}`" in text, f"docs/quantization.md does not name variant.quantization.{f.name}"
    assert QUANTIZE_PRESETS["int4"].describe() in text.replace("\n", " ")


def test_serve_help_names_every_open_route() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    api_key_help = " ".join(result.output.split()).split("--api-key", 1)[1].split("--max-batch", 1)[0]
    for path in GuardPolicy.open_paths:
        assert path in api_key_help


def _documented_body(path: str) -> dict[str, str]:
    row = next(r for r in table("serving.md", "| Endpoint") if r[0] == f"`GET {path}`")
    body = re.search(r"200 `(\{.*?\})`", row[1])
    assert body is not None, row
    return dict(json.loads(body.group(1).replace("…", '"…"')))


def test_serving_doc_probe_bodies_are_what_the_server_answers(packages: dict[str, Path]) -> None:
    service = load_service(ServeConfig(packages["hd16-inplace"], port=0, api_key="k", max_batch=1, max_context=64))
    with BackgroundServer(service) as server:
        for path in ("/health", "/ready"):
            with urllib.request.urlopen(f"{server.url}{path}", timeout=30) as response:  # open route: no key
                got = json.loads(response.read())
            want = _documented_body(path)
            assert set(got) == set(want), path
            assert got["status"] == want["status"], path
