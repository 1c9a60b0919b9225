"""Partial rotary embedding (StableLM RoPE on the first ``rotary_dim`` dims of each head) as a TensorRT plugin.

Importing this package is light (numpy only): torch, triton, onnx, onnxruntime and tensorrt are
imported by the functions that need them. The Triton pieces (``partial_rotary_triton``,
``compile_ptx``) are loaded on first attribute access. See README.md in this folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stlm.plugins.partial_rotary.plugin import register_plugin
from stlm.plugins.partial_rotary.reference import partial_rotary_reference, rotary_cos_sin, rotary_inv_freq
from stlm.plugins.partial_rotary.spec import (
    ATTR_AOT,
    ATTR_PLUGIN_NAMESPACE,
    ATTR_PLUGIN_VERSION,
    ATTR_ROTARY_DIM,
    ATTR_THETA,
    INPUT_NAMES,
    ONNX_DOMAIN,
    ORT_DOMAIN,
    OUTPUT_NAMES,
    PLUGIN_ID,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    make_onnx_node,
    make_ort_custom_op_node,
    onnx_opset_import,
)

if TYPE_CHECKING:
    from stlm.plugins.partial_rotary.aot import CompiledPartialRotary, compile_ptx
    from stlm.plugins.partial_rotary.kernel import partial_rotary_triton
    from stlm.plugins.partial_rotary.ort_op import ort_session_options_with_plugin_op, to_ort_extensions_model

_LAZY = {
    "partial_rotary_triton": "stlm.plugins.partial_rotary.kernel",
    "compile_ptx": "stlm.plugins.partial_rotary.aot",
    "CompiledPartialRotary": "stlm.plugins.partial_rotary.aot",
    "ort_session_options_with_plugin_op": "stlm.plugins.partial_rotary.ort_op",
    "to_ort_extensions_model": "stlm.plugins.partial_rotary.ort_op",
}


def __getattr__(name: str) -> Any:
    """Load the Triton / ONNX Runtime helpers on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ATTR_AOT",
    "ATTR_PLUGIN_NAMESPACE",
    "ATTR_PLUGIN_VERSION",
    "ATTR_ROTARY_DIM",
    "ATTR_THETA",
    "INPUT_NAMES",
    "ONNX_DOMAIN",
    "ORT_DOMAIN",
    "OUTPUT_NAMES",
    "PLUGIN_ID",
    "PLUGIN_NAME",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "CompiledPartialRotary",
    "compile_ptx",
    "make_onnx_node",
    "make_ort_custom_op_node",
    "onnx_opset_import",
    "ort_session_options_with_plugin_op",
    "partial_rotary_reference",
    "partial_rotary_triton",
    "register_plugin",
    "rotary_cos_sin",
    "rotary_inv_freq",
    "to_ort_extensions_model",
]
