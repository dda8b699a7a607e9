"""The classifier tail of an activation-quantized file: one integer layer with float logits.

A folded linear layer exports as ``MatMul(x, W)`` then ``Mul`` by its output scale (the
reparametrization's ``W = s·Ŵ``) then ``Add`` of its bias (through a ``Reshape`` of a constant).
``quantize_static`` would put a QuantizeLinear/DequantizeLinear pair after each of the three and
quantize the bias as a uint8 activation: three requantizations of the logits onto uint8 grids,
each a chance for two runtimes to round a value lying near half a step differently, and uint8
logits tie. Measured on a 73 %-accurate ResNet-18 (docs/results.md): OpenVINO agreed with
onnxruntime on 0.987 of top-1 decisions with that tail, 0.995 with this one.

* :func:`fold_linear_tails` (before quantizing) rewrites each such chain into one
  ``Gemm(x, W·s, b)``: the scale is folded into the weights (a trained grid survives it: each
  output channel's weights are its grid integers times one factor, see grid.py) and the bias
  becomes the Gemm's, quantized to int32 like a Conv's.
* :func:`dequantized_outputs` (after quantizing) removes the QuantizeLinear/DequantizeLinear pair
  on each graph output, so the logits are the last layer's float result, not a uint8 grid.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import graph_index, set_nodes


def _constant(name: str, inits: dict, producer: dict) -> np.ndarray | None:
    """The value of ``name`` when it is an initializer, or a Reshape / Identity of one."""
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producer.get(name)
    if node is not None and node.op_type in ("Reshape", "Identity") and node.input[0] in inits:
        return numpy_helper.to_array(inits[node.input[0]])
    return None


def _rank(model: onnx.ModelProto, name: str) -> int | None:
    for v in list(model.graph.value_info) + list(model.graph.input):
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return None


def _only_consumer(name: str, consumers: dict, op_type: str):
    """The one consumer of ``name`` besides Shape nodes (the exporter's bias Reshape reads the
    MatMul's shape), when it is an ``op_type``."""
    found = [n for n in consumers.get(name, []) if n is None or n.op_type != "Shape"]
    return found[0] if len(found) == 1 and found[0] is not None and found[0].op_type == op_type else None


def _tail(model: onnx.ModelProto, matmul, inits: dict, producer: dict, consumers: dict):
    """``(W·s, b, Mul, Add)`` of the chain MatMul(x, W) -> Mul(s) -> Add(b) starting at
    ``matmul``, or None when it is not one (x not 2-D, W, s or b not constants of its shape)."""
    w = inits.get(matmul.input[1])
    mul = _only_consumer(matmul.output[0], consumers, "Mul")
    add = mul and _only_consumer(mul.output[0], consumers, "Add")
    if w is None or add is None or _rank(model, matmul.input[0]) != 2:
        return None
    w = numpy_helper.to_array(w)
    s = _constant(mul.input[1], inits, producer)
    bias_in = add.input[1] if add.input[0] == mul.output[0] else add.input[0]
    b = _constant(bias_in, inits, producer)
    out = w.shape[1] if w.ndim == 2 else -1
    if s is None or b is None or s.size not in (1, out) or b.size != out or w.dtype != np.float32:
        return None
    folded = (w.astype(np.float64) * s.astype(np.float64).reshape(1, -1)).astype(np.float32)
    return folded, b.astype(np.float32).reshape(out), mul, add


def fold_linear_tails(model: onnx.ModelProto) -> list[str]:
    """Rewrite every MatMul -> Mul(scale) -> Add(bias) chain with constant weights, scale and
    bias and a 2-D input into one Gemm (in place); the names of the Gemms written. The model is
    left as it was when the rewritten graph would read a tensor nothing writes any more."""
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    written = _fold(rewritten)
    if written and _complete(rewritten):
        model.CopyFrom(rewritten)
        return written
    return []


def _fold(model: onnx.ModelProto) -> list[str]:
    inits, producer, consumers = graph_index(model)
    written, drop, replace = [], set(), {}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        found = _tail(model, node, inits, producer, consumers)
        if found is None:
            continue
        w, b, mul, add = found
        name = f"{node.name or node.output[0]}_gemm"
        model.graph.initializer.extend([numpy_helper.from_array(w, f"{name}_weight"),
                                        numpy_helper.from_array(b, f"{name}_bias")])
        replace[node.output[0]] = helper.make_node("Gemm", [node.input[0], f"{name}_weight", f"{name}_bias"],
                                              [add.output[0]], name=name)
        drop |= {mul.output[0], add.output[0]}
        written.append(name)
    set_nodes(model, [replace.get(n.output[0], n) for n in model.graph.node if n.output[0] not in drop])
    return written


def _complete(model: onnx.ModelProto) -> bool:
    """Whether every tensor a node reads is written by a node, an initializer or an input."""
    known = ({i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
             | {o for n in model.graph.node for o in n.output} | {""})
    return all(name in known for n in model.graph.node for name in n.input)


def dequantized_outputs(model: onnx.ModelProto) -> list[str]:
    """Remove the QuantizeLinear -> DequantizeLinear pair in front of each graph output (in
    place): the producer writes the output in float. The names of the outputs changed."""
    _, producer, consumers = graph_index(model)
    changed, drop = [], set()
    for out in model.graph.output:
        dq = producer.get(out.name)
        q = dq is not None and dq.op_type == "DequantizeLinear" and producer.get(dq.input[0])
        if not q or q.op_type != "QuantizeLinear" or len(consumers.get(q.output[0], [])) != 1 \
                or len(consumers.get(q.input[0], [])) != 1 or q.input[0] not in producer:
            continue
        source = producer[q.input[0]]
        source.output[list(source.output).index(q.input[0])] = out.name
        drop.add(q.output[0])  # the pair: q writes it, dq reads it
        changed.append(out.name)
    set_nodes(model, [n for n in model.graph.node if n.output[0] not in drop
                       and not (n.op_type == "DequantizeLinear" and n.input[0] in drop)])
    return changed
