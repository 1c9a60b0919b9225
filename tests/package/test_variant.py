"""The typed graph Variant, the manifest that stores it, and the onnxruntime versions a package needs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from stlm.cli import cli
from stlm.errors import BackendUnavailableError, PackageError
from stlm.package.manifest import MANIFEST_NAME, read_manifest
from stlm.package.ort_versions import MAX_OPSET, MIN_ONNXRUNTIME, check_onnxruntime, required_onnxruntime, version_tuple
from stlm.package.variant import Quantization, Variant

INPLACE = Variant("onnxruntime", "inplace", "fused", "fp32", "fp32", "fp32")


def test_exported_manifests_round_trip_and_say_what_the_graph_does(packages: dict[str, Path]) -> None:
    for name, folder in packages.items():
        variant = read_manifest(folder).variant
        assert Variant.from_dict(json.loads(json.dumps(variant.to_dict()))) == variant
        assert variant.rotary == ("fused" if name.endswith("inplace") else "plain")
        assert variant.logits == "logits_index" and variant.min_onnxruntime == "1.20.1"


BAD_FIELDS: list[tuple[str, Any]] = [
    ("target", "openvino"),
    ("kv_cache", "paged"),
    ("rotary", "yarn"),
    ("weight_dtype", "fp8"),
    ("compute_dtype", None),
    ("kv_dtype", 16),
    ("logits", "last"),
    ("external_data", "no"),
    ("precision_note", 3),
    ("min_onnxruntime", 1.2),
    ("min_onnxruntime", "latest"),
    ("quantization", "int4"),
    ("quantization", {"bits": 3}),
    ("quantization", {"block_size": 48}),
    ("quantization", {"symmetric": 1}),
    ("quantization", {"accuracy_level": 9}),
    ("quantization", {"method": "gptq"}),
    ("quantization", {"bits": 4, "group": 32}),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_malformed_values_are_package_errors_naming_the_field(field: str, value: Any) -> None:
    data = INPLACE.to_dict()
    data[field] = value
    with pytest.raises(PackageError) as info:
        Variant.from_dict(data)
    name = field if not isinstance(value, dict) else "quantization"
    assert f"variant.{name}" in str(info.value) and "export the package again" in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"rotary": "plain"},  # an in-place graph always fuses its rotary into GroupQueryAttention
        {"kv_cache": "concat"},  # ... and only it does
        {"target": "tensorrt"},  # TensorRT takes no in-place cache
        {"kv_dtype": "bf16"},  # GroupQueryAttention has no bf16 CPU kernel
        {"kv_cache": "concat", "rotary": "plugin"},  # the plugin is for the TensorRT target
        {"kv_cache": "concat", "rotary": "plain", "target": "tensorrt", "quantization": Quantization.preset("int4")},
    ],
)
def test_inconsistent_variants_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(PackageError, match="variant"):
        dataclasses.replace(INPLACE, **changes)


def test_unknown_and_missing_fields() -> None:
    with pytest.raises(PackageError, match="unknown fields"):
        Variant.from_dict({**INPLACE.to_dict(), "paged": True})
    with pytest.raises(PackageError, match="lacks"):
        Variant.from_dict({k: v for k, v in INPLACE.to_dict().items() if k != "kv_cache"})
    with pytest.raises(PackageError, match="JSON object"):
        Variant.from_dict([1, 2])


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(Variant)] + ["x"]), JSON, max_size=12))
def test_any_json_is_a_variant_or_a_package_error(data: dict[str, Any]) -> None:
    try:
        Variant.from_dict({**INPLACE.to_dict(), **data})
    except PackageError:
        pass


def _rewrite_manifest(src: Path, dst: Path, edit: Any) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / MANIFEST_NAME).read_text())
    edit(data)
    (dst / MANIFEST_NAME).write_text(json.dumps(data))
    return dst


def test_old_and_inconsistent_manifests_are_refused(package: Path, tmp_path: Path) -> None:
    old = _rewrite_manifest(package, tmp_path / "old", lambda d: d.update(format_version=1))
    with pytest.raises(PackageError, match="export the package again"):
        read_manifest(old)
    newer = _rewrite_manifest(package, tmp_path / "newer", lambda d: d.update(format_version=3))
    with pytest.raises(PackageError, match="upgrade stlm"):
        read_manifest(newer)
    lying = _rewrite_manifest(
        package, tmp_path / "lying", lambda d: d["variant"].update(kv_cache="inplace", rotary="fused")
    )
    with pytest.raises(PackageError, match="contract differs"):
        read_manifest(lying)
    bad_field = _rewrite_manifest(package, tmp_path / "bad", lambda d: d["variant"].update(kv_dtype="fp64"))
    with pytest.raises(PackageError, match=r"variant\.kv_dtype"):
        read_manifest(bad_field)


# -- onnxruntime versions ---------------------------------------------------------------------------
def test_required_onnxruntime_follows_the_features() -> None:
    assert required_onnxruntime(INPLACE, 18) == "1.20.1"
    int4 = dataclasses.replace(INPLACE, quantization=Quantization.preset("int4"))
    assert required_onnxruntime(int4, 18) == "1.22.1"  # its LM head is MatMulNBits with 8 bits
    native = Variant("tensorrt", "concat", "native", "fp32", "fp32", "fp32")
    assert required_onnxruntime(native, 23) == "1.24.4"
    assert required_onnxruntime(dataclasses.replace(INPLACE), 22) == "1.21.1"
    opsets = [version_tuple(MIN_ONNXRUNTIME[f"opset-{o}"]) for o in range(17, MAX_OPSET + 1)]
    assert all(a <= b for a, b in itertools.pairwise(opsets))


def test_an_older_onnxruntime_is_named_not_called_corrupt(package: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match=r"needs onnxruntime >= 1\.22\.1 \(installed: 1\.20\.1\)"):
        check_onnxruntime("1.22.1", "1.20.1", package="pkg")
    check_onnxruntime("1.22.1", "1.22.1+cpu", package="pkg")
    future = _rewrite_manifest(package, tmp_path / "future", lambda d: d["variant"].update(min_onnxruntime="99.0"))
    result = CliRunner().invoke(cli, ["generate", str(future), "-p", "hi", "-n", "2"])
    assert result.exit_code == 2 and "this package needs onnxruntime >= 99.0" in result.output
    assert "corrupt" not in result.output
