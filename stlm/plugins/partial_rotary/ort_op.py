"""Run partial-rotary plugin graphs in ONNX Runtime (CPU) through onnxruntime-extensions.

onnxruntime-extensions Python ops live in the fixed domain ``ai.onnx.contrib`` and exchange only
float32 (and integer) tensors: a float16/bfloat16 input aborts the process. The TensorRT-target
node (domain ``stlm``) therefore cannot run as is. :func:`to_ort_extensions_model` rewrites each
plugin node into the ORT form: same op_type / attributes, domain ``ai.onnx.contrib``, an extra
``io_dtype`` attribute, and for fp16/bf16 graphs Cast nodes around it. The op widens values to
float32 and back; inside, it casts them to ``io_dtype`` and runs the numpy reference in that dtype,
so the results equal the reference bit for bit (float16/bfloat16 -> float32 -> back is exact).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from stlm.errors import BackendUnavailableError, InvalidArgumentError
from stlm.package.dtypes import DTYPE_OF_ONNX, ONNX_FLOAT, ONNX_TYPE, DType, numpy_dtype
from stlm.plugins.partial_rotary.reference import partial_rotary_reference
from stlm.plugins.partial_rotary.spec import (
    ATTR_IO_DTYPE,
    ATTR_ROTARY_DIM,
    ATTR_THETA,
    ONNX_DOMAIN,
    ORT_DOMAIN,
    ORT_DOMAIN_VERSION,
    PLUGIN_NAME,
    is_plugin_node,
    make_ort_custom_op_node,
    node_attributes,
    validate_dtype,
)

if TYPE_CHECKING:
    import onnx
    import onnxruntime


_lock = threading.Lock()
_registered = False


def ort_partial_rotary(
    q: np.ndarray, k: np.ndarray, position_ids: np.ndarray, *, rotary_dim: int, theta: float, io_dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """The custom op's body: float32 in/out, computed by the reference in ``io_dtype`` (pure)."""
    dtype = numpy_dtype(validate_dtype(io_dtype))
    q_out, k_out = partial_rotary_reference(
        np.asarray(q).astype(dtype),
        np.asarray(k).astype(dtype),
        np.asarray(position_ids),
        rotary_dim=rotary_dim,
        theta=theta,
    )
    return q_out.astype(np.float32), k_out.astype(np.float32)


def register_ort_op() -> None:
    """Register the Python op ``ai.onnx.contrib::partial_rotary`` with onnxruntime-extensions (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        try:
            from onnxruntime_extensions import PyCustomOpDef, onnx_op
        except ImportError as exc:
            raise BackendUnavailableError(
                "onnxruntime-extensions is not installed", fix="pip install 'stlm[plugins]'"
            ) from exc

        @onnx_op(
            op_type=PLUGIN_NAME,
            inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64],
            outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
            attrs={
                ATTR_ROTARY_DIM: PyCustomOpDef.dt_int64,
                ATTR_THETA: PyCustomOpDef.dt_float,
                ATTR_IO_DTYPE: PyCustomOpDef.dt_string,
            },
        )
        def _partial_rotary_op(
            q: np.ndarray, k: np.ndarray, position_ids: np.ndarray, rotary_dim: int, theta: float, io_dtype: str
        ) -> tuple[np.ndarray, np.ndarray]:
            return ort_partial_rotary(q, k, position_ids, rotary_dim=rotary_dim, theta=theta, io_dtype=io_dtype)

        _registered = True


def ort_session_options_with_plugin_op() -> onnxruntime.SessionOptions:
    """SessionOptions with the onnxruntime-extensions library (and the partial_rotary op) registered.

    Use it with models from :func:`to_ort_extensions_model` on the CPU execution provider.
    """
    try:
        import onnxruntime
        from onnxruntime_extensions import get_library_path
    except ImportError as exc:
        raise BackendUnavailableError(
            "onnxruntime and onnxruntime-extensions are needed", fix="pip install 'stlm[plugins]'"
        ) from exc
    register_ort_op()
    options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options


def _known_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    import onnx

    graph = model.graph
    try:
        graph = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:  # noqa: BLE001 - inference is best effort (e.g. models over 2 GiB): fall back to declared types
        pass
    types: dict[str, int] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def _node_dtype(node: onnx.NodeProto, dtype: DType | None, elem_types: dict[str, int]) -> DType:
    """The dtype a plugin node computes in: ``dtype`` when given, else its q input's."""
    if len(node.input) != 3 or len(node.output) != 2 or not all(node.input):
        raise InvalidArgumentError(
            f"plugin node {node.name!r} must have inputs (q, k, position_ids) and outputs (q_out, k_out), "
            f"got {list(node.input)} -> {list(node.output)}"
        )
    if dtype is not None:
        return validate_dtype(dtype)
    if elem_types.get(node.input[0]) in DTYPE_OF_ONNX:
        return DTYPE_OF_ONNX[elem_types[node.input[0]]]
    raise InvalidArgumentError(
        f"cannot tell the dtype of {node.input[0]!r}, the q input of plugin node {node.name!r}",
        fix="pass dtype='fp32', 'fp16' or 'bf16' to to_ort_extensions_model",
    )


def _ort_nodes(node: onnx.NodeProto, io_dtype: DType, index: int) -> list[onnx.NodeProto]:
    """The onnxruntime-extensions form of one plugin node (float32 op, with Casts around it for fp16/bf16)."""
    from onnx import helper

    rotary_dim, theta = node_attributes(node)
    names = list(node.input) + list(node.output)
    name = node.name or f"partial_rotary_{index}"
    if io_dtype == "fp32":
        return [make_ort_custom_op_node(*names, rotary_dim=rotary_dim, theta=theta, name=name, io_dtype="fp32")]
    prefix = f"{name}/ort"
    wide = [f"{prefix}/{role}_f32" for role in ("q", "k", "q_out", "k_out")]
    widen = [
        helper.make_node("Cast", [n], [w], to=ONNX_FLOAT, name=f"{w}/cast")
        for n, w in zip(names[:2], wide[:2], strict=True)
    ]
    op = make_ort_custom_op_node(
        wide[0], wide[1], names[2], wide[2], wide[3], rotary_dim=rotary_dim, theta=theta,
        name=node.name or prefix, io_dtype=io_dtype,
    )  # fmt: skip
    narrow = [
        helper.make_node("Cast", [w], [n], to=ONNX_TYPE[io_dtype], name=f"{w}/cast")
        for w, n in zip(wide[2:], names[3:], strict=True)
    ]
    return [*widen, op, *narrow]


def to_ort_extensions_model(model: onnx.ModelProto, *, dtype: DType | None = None) -> onnx.ModelProto:
    """Return a copy of ``model`` whose TensorRT plugin nodes use the onnxruntime-extensions op.

    The q dtype of each node is found by ONNX shape inference (or the graph's declared types);
    pass ``dtype`` when it cannot be (it then applies to every plugin node). Nodes inside
    subgraphs are not rewritten.
    """
    import onnx
    from onnx import helper

    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    elem_types = _known_elem_types(model) if dtype is None else {}
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if is_plugin_node(node):
            new_nodes += _ort_nodes(node, _node_dtype(node, dtype, elem_types), count)
            count += 1
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if count and not any(op.domain == ORT_DOMAIN for op in rewritten.opset_import):
        rewritten.opset_import.append(helper.make_opsetid(ORT_DOMAIN, ORT_DOMAIN_VERSION))
    if count and not any(n.domain == ONNX_DOMAIN for n in graph.node):
        kept = [op for op in rewritten.opset_import if op.domain != ONNX_DOMAIN]
        del rewritten.opset_import[:]
        rewritten.opset_import.extend(kept)
    return rewritten
