"""A small ONNX graph builder: node naming, shared constants, initializers inline or external."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from stlm.package.dtypes import ONNX_ELEM


class InitializerStore:
    """Collects initializers, inline or appended to one external data file."""

    def __init__(self, data_path: Path | None) -> None:
        self.data_path = data_path
        self.tensors: list[TensorProto] = []
        self.nbytes = 0
        self._file = data_path.open("wb") if data_path is not None else None

    def add(self, name: str, array: np.ndarray) -> str:
        """Store ``array`` as initializer ``name`` and return the name."""
        array = np.ascontiguousarray(array)
        elem = ONNX_ELEM[array.dtype.name]
        if self._file is None or array.nbytes < 1024:
            tensor = helper.make_tensor(name, elem, array.shape, array.tobytes(), raw=True)
        else:
            offset = self._file.tell()
            self._file.write(array.tobytes())
            tensor = TensorProto(name=name, data_type=elem, dims=array.shape)
            tensor.data_location = TensorProto.EXTERNAL
            assert self.data_path is not None
            for key, value in (
                ("location", self.data_path.name),
                ("offset", str(offset)),
                ("length", str(array.nbytes)),
            ):
                tensor.external_data.add(key=key, value=value)
        self.nbytes += array.nbytes
        self.tensors.append(tensor)
        return name

    def close(self) -> None:
        """Flush and close the external data file."""
        if self._file is not None:
            self._file.close()
            self._file = None


class GraphBuilder:
    """Emits ONNX nodes with unique names; ``weights``/``compute``: dtypes of stored weights, activations."""

    def __init__(
        self, store: InitializerStore, weights: np.dtype | None = None, compute: np.dtype | None = None
    ) -> None:
        self.store = store
        self.weights = np.dtype(weights or np.float32)
        self.compute = np.dtype(compute or self.weights)
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0
        self._consts: dict[tuple[Any, ...], str] = {}

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"/{hint}_{self._count}"

    def op(
        self,
        op_type: str,
        *inputs: str,
        outputs: int = 1,
        name: str | None = None,
        domain: str = "",
        out_names: Sequence[str] | None = None,
        **attrs: Any,
    ) -> Any:
        """Append a node; returns its output name (or a list when ``outputs`` > 1)."""
        node_name = name or self._fresh(op_type)
        outs = list(out_names) if out_names else [f"{node_name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def weight(self, name: str, array: np.ndarray) -> str:
        """Store float ``array`` as initializer ``name`` in the weight dtype; return it in the compute dtype."""
        stored = self.store.add(name, array.astype(self.weights, copy=False))
        return self.cast(stored, self.compute, name=f"/{name}/cast")

    def cast(self, x: str, dtype: np.dtype, name: str | None = None) -> str:
        """``x`` (of the other float dtype) as ``dtype``; a no-op when weights and compute agree."""
        if self.weights == self.compute:
            return x
        return self.op("Cast", x, to=ONNX_ELEM[np.dtype(dtype).name], name=name)

    def const(self, values: Any, dtype: np.dtype | type = np.int64) -> str:
        """A small constant initializer, shared between uses."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.name, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.store.add(f"const_{len(self._consts)}", arr)
        return self._consts[key]
