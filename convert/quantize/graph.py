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


def graph_index(model: onnx.ModelProto) -> tuple[dict, dict, dict]:
    """Initializers by name, the node writing each tensor, the nodes reading each (None: a graph output)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    for o in g.output:
        consumers.setdefault(o.name, []).append(None)  # a graph output counts as a consumer
    return {i.name: i for i in g.initializer}, producer, consumers


def set_nodes(model: onnx.ModelProto, nodes: list) -> None:
    """``nodes`` as the graph's, less those nothing reads any more (a bias Reshape and the
    Shape chain feeding it, say), and the initializers nothing reads dropped."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {name for n in nodes for name in n.input} | outputs
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for n in nodes for name in n.input} | outputs
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
