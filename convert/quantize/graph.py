"""ONNX graph helpers shared by the quantized formats."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto

WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1)}


def opset_of(model: onnx.ModelProto) -> int | None:
    """The default domain's opset (None when the model imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def set_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    current = opset_of(model) or 0
    if current >= version:
        return model
    # Not onnx.version_converter: it litters the graph with Identity nodes. The ops an exported
    # classifier uses did not change meaning between opsets 18 and 21 (only new integer types).
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = version
    return model


def dq_weight_names(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [n.input[0] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits]


def weight_storage(path: Path) -> dict:
    """Counts of integer initializers feeding DequantizeLinear nodes, by element type."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    kinds: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            t = TensorProto.DataType.Name(inits[n.input[0]].data_type).lower()
            kinds[t] = kinds.get(t, 0) + 1
    return kinds
