"""Ranges of the weights an ONNX graph feeds to its Conv, ConvTranspose, Gemm and MatMul nodes
(and QLinearConv / QLinearMatMul), subgraphs of If/Loop/Scan included.

A weight operand is followed backwards through value-preserving ops (Identity, Transpose,
Reshape, ...) to where it comes from:

* an initializer: read, never evaluated ("direct");
* ``Mul(stored, scale)`` of two constants where ``scale`` is a scalar or a vector over the first
  (output) axis of ``stored``: the explicit weight-side scale of :mod:`.scaled`, and ``stored`` is
  what must lie in [-1, 1] ("weight-side Mul");
* any other constant subexpression (a ``DequantizeLinear`` of an integer initializer, a
  ``Constant`` node, arithmetic on constants): evaluated with the ONNX reference evaluator, and
  its value is what must lie in [-1, 1] ("dequantized", "direct" for a Constant node, or
  "computed in graph");
* anything that depends on a graph input is an activation, not a weight (a MatMul of two
  activations is attention); a Conv weight that does, or a weight that cannot be evaluated, is
  refused with :class:`UserInputError` naming the node.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import RangeError, UserInputError
from .onnx_graph import ACT, CONST, GraphIndex, Request, evaluate, is_default, label, read_initializer
from .reading import load_onnx

WEIGHT_OPS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1),
              "QLinearConv": (3,), "QLinearMatMul": (0, 3)}
FIXED_SLOT = {"Conv", "ConvTranspose", "QLinearConv"}     # the weight is always this input
QUANTIZED = {"QLinearConv": {3: 0}, "QLinearMatMul": {0: -2, 3: -1}}  # slot -> dequantize axis
PASS_THROUGH = {"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
                "Slice", "Split", "Gather", "Expand"}
UNIT_TOL = 0.0  # stored weights must be in [-1, 1] exactly


@dataclass
class WeightRange:
    node: str
    op: str
    initializer: str  # the tensor checked: an initializer, or the value computed in the graph
    shape: list[int]
    max_abs: float
    via: str          # "direct", "weight-side Mul", "dequantized" or "computed in graph"

    @property
    def in_unit_range(self) -> bool:
        return self.max_abs <= 1.0 + UNIT_TOL  # False for NaN


def load_model(path: Path) -> onnx.ModelProto:
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UserInputError(f"{path} is empty (0 bytes), not an ONNX model")
        model = load_onnx(path)  # reading.py: regular file, bounded, external data checked
    except FileNotFoundError:
        raise UserInputError(f"{path} does not exist") from None
    except UserInputError:
        raise
    except Exception as e:
        raise UserInputError(f"{path} is not a readable ONNX file ({type(e).__name__})") from None
    if not model.graph.node:
        raise UserInputError(f"{path} is not an ONNX model with a graph (no nodes)")
    return model


def weight_ranges(model: onnx.ModelProto) -> list[WeightRange]:
    """One entry per weight input; raises :class:`UserInputError` when there is none to check, or
    when a weight cannot be traced to constants."""
    index = GraphIndex(model)
    found = []  # (consumer node, slot, scope)
    for k, node in enumerate(index.nodes):
        if node.op_type in WEIGHT_OPS and is_default(node):
            slot = _weight_operand(index, k)
            if slot is not None:
                found.append((k, slot))
    if not found:
        raise UserInputError("no Conv/ConvTranspose/Gemm/MatMul weight in the graph: nothing to check")
    plans = [_plan(index, k, slot) for k, slot in found]
    evaluate(index, [r for p in plans for r in p.requests()])
    second = [p for p in plans if p.needs_product()]
    evaluate(index, [p.product for p in second])
    return [p.finish() for p in plans]


def _source(index: GraphIndex, name: str, scope):
    """Follow ``name`` back through value-preserving ops: ``(name, scope, binding)`` of its source."""
    b = index.binding(name, scope)
    while b.node is not None and index.nodes[b.node].op_type in PASS_THROUGH \
            and is_default(index.nodes[b.node]) and index.nodes[b.node].input:
        scope = index.scopes[b.node]
        name = index.nodes[b.node].input[0]
        b = index.binding(name, scope)
    return name, scope, b


def _weight_operand(index: GraphIndex, k: int) -> int | None:
    """Index of the weight input of node ``k``, None if it has none.

    Conv takes its weight second (QLinearConv fourth), whatever it depends on. A Gemm or MatMul
    from ``nn.Linear`` does too (``x @ W^T``); its first operand is the weight only when the
    second is an activation (``P @ x``). When both are constant (a layer applied to a constant
    table, as in Swin V2's position bias) the first one is data, not a weight; when neither is
    (attention), the node has no weight.
    """
    node, scope = index.nodes[k], index.scopes[k]
    slots = [i for i in WEIGHT_OPS[node.op_type] if i < len(node.input) and node.input[i]]
    if node.op_type in FIXED_SLOT:
        return slots[-1] if slots else None
    weights = [i for i in slots if _source(index, node.input[i], scope)[2].status != ACT]
    if not weights:
        return None
    return max(weights)


@dataclass
class _Plan:
    node: onnx.NodeProto
    name: str
    via: str
    direct: tuple[list[int], float] | None = None
    operands: list[Request] | None = None     # Mul(a, b): both evaluated or read
    product: Request | None = None            # the value itself, when it must be evaluated
    consumer: Request | None = None           # the weight as the node gets it (for its shape)
    slot: int = 1

    def requests(self) -> list[Request]:
        if self.operands is not None:
            return [r for r in self.operands + [self.consumer] if r is not None and r.result is None]
        return [self.product] if self.product is not None and self.direct is None else []

    def stored(self) -> Request | None:
        """The operand of a weight-side Mul that is stored, when the other one is a scale: a
        scalar, or per output channel with no more values than the node has output channels."""
        a, b = self.operands
        shape = self.consumer.result[0] if self.consumer is not None else None
        if self.name == self.node.input[self.slot]:  # the node reads the product itself
            shape = list(np.broadcast_shapes(tuple(a.result[0]), tuple(b.result[0])))
        fan_in = _fan_in(self.node, self.slot, shape) if shape else None
        cands = [x for x, s in ((a, b), (b, a)) if _is_scale(s.result[0], x.result[0], fan_in)]
        return max(cands, key=lambda r: r.result[1]) if cands else None

    def needs_product(self) -> bool:
        return self.operands is not None and self.stored() is None

    def finish(self) -> WeightRange:
        op, who = self.node.op_type, label(self.node)
        if self.direct is not None:
            return WeightRange(who, op, self.name, *self.direct, self.via)
        if self.operands is not None and self.stored() is not None:
            s = self.stored()
            return WeightRange(who, op, s.name, *s.result, "weight-side Mul")
        return WeightRange(who, op, self.name, *self.product.result, self.via)


def _is_scale(scale: list[int], stored: list[int], fan_in: int | None) -> bool:
    """A scalar, or ``[C, 1, ..., 1]`` over the first axis of ``stored`` where the node that reads
    the weight sums ``fan_in`` weights per output: at most one scale per output channel (a
    weight reshaped to ``[N, 1]`` cannot pass a per-element factor off as a scale)."""
    size, total = math.prod(scale), math.prod(stored)
    if size == 1:
        return len(scale) <= len(stored)
    return (fan_in is not None and size * fan_in <= total and len(scale) == len(stored)
            and scale[0] == stored[0] and all(d == 1 for d in scale[1:]))


def _fan_in(node: onnx.NodeProto, slot: int, shape: list[int]) -> int | None:
    """How many weights of ``shape`` (the node's weight input) each output sums."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return math.prod(shape[1:])
    if node.op_type == "ConvTranspose":
        return shape[0] // max(int(attrs.get("group", 1)), 1) * math.prod(shape[2:])
    if len(shape) < 2:
        return None
    if node.op_type == "Gemm":
        transposed = bool(attrs.get("transB" if slot == 1 else "transA", 0))
        return shape[1 if transposed == (slot == 1) else 0]
    return shape[-2] if slot == 1 else shape[-1]  # MatMul


def _plan(index: GraphIndex, k: int, slot: int) -> _Plan:
    node, scope = index.nodes[k], index.scopes[k]
    why = f"the weight of {node.op_type} {label(node)}"
    axis = QUANTIZED.get(node.op_type, {}).get(slot)
    if axis is not None:
        return _quantized_plan(index, k, slot, axis, why)
    name, src_scope, b = _source(index, node.input[slot], scope)
    if b.status != CONST:
        what = "depends on the graph's input" if b.status == ACT else "cannot be traced to constants"
        producer = index.producer(b)
        src = f"{producer.op_type} {label(producer)}" if producer is not None else repr(name)
        raise UserInputError(f"{why} {what} (it comes from {src}); its range cannot be checked")
    if b.init is not None:
        return _Plan(node, name, "direct", direct=read_initializer(b.init))
    producer = index.producer(b)
    if producer.op_type == "Mul" and len([i for i in producer.input if i]) == 2:
        p_scope = index.scopes[b.node]
        ops = [_operand(index, i, p_scope, why) for i in producer.input]
        w = node.input[slot]
        consumer = Request(w, scope, why) if w != name and index.binding(w, scope).status == CONST else None
        return _Plan(node, name, "computed in graph", operands=ops, product=Request(name, src_scope, why),
                     consumer=consumer, slot=slot)
    via = {"Constant": "direct", "DequantizeLinear": "dequantized"}.get(producer.op_type, "computed in graph")
    return _Plan(node, name, via, product=Request(name, src_scope, why))


def _operand(index: GraphIndex, name: str, scope, why: str) -> Request:
    req = Request(name, scope, why)
    b = index.binding(name, scope)
    if b.init is not None:
        req.result = read_initializer(b.init)
    return req


def _quantized_plan(index: GraphIndex, k: int, slot: int, axis: int, why: str) -> _Plan:
    """QLinearConv / QLinearMatMul: the weight is ``(w - zero point) * scale``, evaluated."""
    node, scope = index.nodes[k], index.scopes[k]
    ins = list(node.input[slot:slot + 3])
    for name in ins:
        if name and index.binding(name, scope).status != CONST:
            raise UserInputError(f"{why} is not a constant ({name!r}); its range cannot be checked")
    out = f"{node.input[slot]}__dequantized_for_{label(node)}"
    dq = helper.make_node("DequantizeLinear", ins, [out], axis=axis)
    return _Plan(node, node.input[slot], "dequantized", product=Request(out, scope, why, extra=dq))


def check_unit_range(ranges: list[WeightRange], what: str) -> None:
    bad = [r for r in ranges if not r.in_unit_range]
    if bad:
        worst = max(bad, key=lambda r: r.max_abs if r.max_abs == r.max_abs else float("inf"))
        raise RangeError(f"{what}: {len(bad)} weight tensor(s) outside [-1, 1] "
                         f"(worst {worst.initializer}: max|w|={worst.max_abs:.6g}, {worst.via})")


def ranges_to_dicts(ranges: list[WeightRange]) -> list[dict]:
    return [asdict(r) | {"in_unit_range": r.in_unit_range} for r in ranges]
