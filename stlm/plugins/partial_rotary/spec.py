"""The partial-rotary plugin contract: names, attributes, validation and the ONNX node builders.

The TensorRT ONNX parser maps an unknown op to a plugin (its "fallback plugin importer") by
looking up the creator ``(op_type, plugin_version, plugin_namespace)``, where ``plugin_version``
and ``plugin_namespace`` are STRING node attributes (defaults ``"1"`` and ``""``). Only recent
parsers retry a failed lookup with the node's domain as the namespace (onnx-tensorrt's main
branch does; its 10.0/10.1 release branches do not), so the node always carries
``plugin_namespace`` and never relies on that retry. For a ``tensorrt.plugin``
("quickly deployable") plugin the INT attribute ``aot`` picks the implementation:
``aot=1`` -> ``QuickPluginCreationRequest.kSTRICT_AOT`` (the PTX from ``@trtp.aot_impl`` is baked
into the engine), ``aot=0`` -> ``kSTRICT_JIT`` (the Python ``@trtp.impl`` runs at inference).
Node attributes named like a registered plugin attribute (``rotary_dim``, ``theta``) become
plugin fields (INT -> int32, FLOAT -> float32; ``tensorrt.plugin`` converts them to the
registered ``int`` / ``float``); the other attributes are not passed to the plugin.

Sources: NVIDIA/TensorRT ``samples/python/quickly_deployable_plugins/README.md`` ("ONNX model with
a plugin", "ONNX model with an AOT plugin") and onnx/onnx-tensorrt ``onnxOpImporters.cpp`` /
``onnxOpCheckers.cpp`` (``FallbackPluginImporter``: ``importPluginCreator(ctx, op_type,
plugin_version, plugin_namespace)``, then, on main only, ``node.domain()``) and
``importerUtils.cpp`` (``attrs.get<int>("aot", 0)``).

This module imports ``onnx`` only inside the node builders.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Final

from stlm.errors import InvalidArgumentError
from stlm.package.dtypes import DTYPES, DType

if TYPE_CHECKING:
    import onnx

_log = logging.getLogger(__name__)

PLUGIN_NAME: Final = "partial_rotary"
PLUGIN_NAMESPACE: Final = "stlm"
PLUGIN_VERSION: Final = "1"
PLUGIN_ID: Final = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
"""The id given to ``tensorrt.plugin.register`` ("namespace::name")."""

ONNX_DOMAIN: Final = PLUGIN_NAMESPACE
"""Domain of the TensorRT-target node (for the ONNX checker). TensorRT finds the plugin by the
``plugin_namespace`` attribute; only recent parsers fall back to the domain when that fails."""
ONNX_DOMAIN_VERSION: Final = 1

ORT_DOMAIN: Final = "ai.onnx.contrib"
"""The only domain onnxruntime-extensions registers Python custom ops in."""
ORT_DOMAIN_VERSION: Final = 1

# Node attribute names.
ATTR_ROTARY_DIM: Final = "rotary_dim"  # INT: leading dims of each head that are rotated
ATTR_THETA: Final = "theta"  # FLOAT: RoPE base
ATTR_PLUGIN_NAMESPACE: Final = "plugin_namespace"  # STRING, read by the TensorRT ONNX parser
ATTR_PLUGIN_VERSION: Final = "plugin_version"  # STRING, read by the TensorRT ONNX parser
ATTR_AOT: Final = "aot"  # INT 0/1, read by the TensorRT ONNX parser for tensorrt.plugin plugins
ATTR_IO_DTYPE: Final = "io_dtype"  # STRING, ORT-extensions form only (see ort_op.py)

INPUT_NAMES: Final = ("q", "k", "position_ids")
OUTPUT_NAMES: Final = ("q_out", "k_out")

MAX_POSITION: Final = 1 << 24
"""Positions must be below 2**24 so that ``float32(position)`` is exact (as in the reference)."""


def validate_attributes(rotary_dim: int, theta: float, head_dim: int | None = None) -> None:
    """Raise :class:`InvalidArgumentError` unless ``rotary_dim``/``theta`` (and ``head_dim``) are usable."""
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise InvalidArgumentError(
            f"rotary_dim must be an int, got {rotary_dim!r}",
            fix="pass rotary_dim=int(head_dim * partial_rotary_factor)",
        )
    if rotary_dim <= 0 or rotary_dim % 2:
        raise InvalidArgumentError(
            f"rotary_dim must be a positive even number, got {rotary_dim}",
            fix="rotate_half splits the rotated dims in two halves: use an even rotary_dim (20 for StableLM-3B)",
        )
    if head_dim is not None and rotary_dim > head_dim:
        raise InvalidArgumentError(
            f"rotary_dim {rotary_dim} is larger than the head dim {head_dim}",
            fix="rotary_dim must be at most head_dim (head_dim * partial_rotary_factor)",
        )
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1.0:
        raise InvalidArgumentError(
            f"theta must be a finite number > 1, got {theta!r}",
            fix="pass the config's rope_theta (10000 for StableLM-3B)",
        )


def validate_dtype(dtype: str) -> DType:
    """Return ``dtype`` as a :data:`DType` (fp32/fp16/bf16) or raise :class:`InvalidArgumentError`."""
    if dtype not in DTYPES:
        raise InvalidArgumentError(
            f"partial_rotary supports q/k of dtype {', '.join(DTYPES)}, got {dtype!r}",
            fix="cast q and k to float32, float16 or bfloat16",
        )
    return dtype


def _check_names(**names: str) -> None:
    for key, value in names.items():
        if not isinstance(value, str) or not value:
            raise InvalidArgumentError(f"{key} must be a non-empty tensor name, got {value!r}")


def _warn_if_theta_not_float32(theta: float) -> None:
    import numpy as np

    if float(np.float32(theta)) != float(theta):
        _log.warning(
            "theta=%r is not exactly representable as float32; ONNX stores %r, so inv_freq may differ "
            "from a float64-theta reference in the last bit",
            theta,
            float(np.float32(theta)),
        )


def _plugin_node(
    domain: str, names: list[str], name: str, rotary_dim: int, theta: float, extra: dict[str, Any]
) -> onnx.NodeProto:
    """A partial_rotary node in ``domain``: inputs (q, k, position_ids), outputs (q_out, k_out)."""
    from onnx import helper

    validate_attributes(rotary_dim, theta)
    q, k, position_ids, q_out, k_out = names
    _check_names(q=q, k=k, position_ids=position_ids, q_out=q_out, k_out=k_out, name=name)
    attributes: dict[str, Any] = {
        ATTR_ROTARY_DIM: int(rotary_dim),
        ATTR_THETA: float(theta),
        ATTR_PLUGIN_NAMESPACE: PLUGIN_NAMESPACE,
        ATTR_PLUGIN_VERSION: PLUGIN_VERSION,
        **extra,
    }
    return helper.make_node(PLUGIN_NAME, [q, k, position_ids], [q_out, k_out], name=name, domain=domain, **attributes)


def make_onnx_node(
    q: str,
    k: str,
    position_ids: str,
    q_out: str,
    k_out: str,
    *,
    rotary_dim: int,
    theta: float,
    name: str,
    aot: bool = True,
) -> onnx.NodeProto:
    """Build the TensorRT-target plugin node (domain :data:`ONNX_DOMAIN`).

    Attributes: ``rotary_dim`` (INT), ``theta`` (FLOAT), ``plugin_namespace="stlm"``,
    ``plugin_version="1"``, ``aot`` (INT, 1 = AOT PTX baked in the engine, 0 = Python JIT impl).
    The model must import the domain: add :func:`onnx_opset_import` to ``opset_import``.
    """
    _warn_if_theta_not_float32(theta)
    return _plugin_node(
        ONNX_DOMAIN, [q, k, position_ids, q_out, k_out], name, rotary_dim, theta, {ATTR_AOT: int(bool(aot))}
    )


def make_ort_custom_op_node(
    q: str,
    k: str,
    position_ids: str,
    q_out: str,
    k_out: str,
    *,
    rotary_dim: int,
    theta: float,
    name: str,
    io_dtype: DType = "fp32",
) -> onnx.NodeProto:
    """Build the onnxruntime-extensions form of the node (domain :data:`ORT_DOMAIN`).

    onnxruntime-extensions Python ops only exchange float32 (not float16/bfloat16) tensors, so
    this node's q/k/q_out/k_out are always float32; ``io_dtype`` names the model dtype the op
    emulates exactly (values are cast to it inside the op, and back to float32 losslessly).
    For fp16/bf16 graphs use :func:`stlm.plugins.partial_rotary.ort_op.to_ort_extensions_model`,
    which also inserts the Cast nodes.
    """
    return _plugin_node(
        ORT_DOMAIN,
        [q, k, position_ids, q_out, k_out],
        name,
        rotary_dim,
        theta,
        {ATTR_IO_DTYPE: validate_dtype(io_dtype)},
    )


def onnx_opset_import() -> onnx.OperatorSetIdProto:
    """The ``opset_import`` entry a model containing :func:`make_onnx_node` nodes needs."""
    from onnx import helper

    return helper.make_opsetid(ONNX_DOMAIN, ONNX_DOMAIN_VERSION)


def is_plugin_node(node: onnx.NodeProto) -> bool:
    """True for a TensorRT-target partial-rotary node (as built by :func:`make_onnx_node`)."""
    if node.op_type != PLUGIN_NAME or node.domain == ORT_DOMAIN:
        return False
    namespace = next((a.s.decode() for a in node.attribute if a.name == ATTR_PLUGIN_NAMESPACE), None)
    return node.domain == ONNX_DOMAIN or namespace == PLUGIN_NAMESPACE


def node_attributes(node: onnx.NodeProto) -> tuple[int, float]:
    """Return ``(rotary_dim, theta)`` of a plugin node, or raise :class:`InvalidArgumentError`."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    missing = [a for a in (ATTR_ROTARY_DIM, ATTR_THETA) if a not in attrs]
    if missing:
        raise InvalidArgumentError(
            f"partial_rotary node {node.name!r} lacks attribute(s) {', '.join(missing)}",
            fix="build plugin nodes with stlm.plugins.partial_rotary.make_onnx_node",
        )
    rotary_dim, theta = int(attrs[ATTR_ROTARY_DIM]), float(attrs[ATTR_THETA])
    validate_attributes(rotary_dim, theta)
    return rotary_dim, theta
