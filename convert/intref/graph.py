"""Reading a QDQ ONNX graph into integer steps.

A *step* produces one quantized tensor, the output of a ``QuantizeLinear`` (named like it):

* ``input``: ``QuantizeLinear`` of a float graph input (the network input, quantized once);
* ``requant``: ``DequantizeLinear``(s) -> one core op (Conv, Gemm, MatMul, Add, MaxPool,
  AveragePool, GlobalAveragePool, ReduceMean, Concat, Flatten, Reshape, or none) -> any chain of
  Relu/Clip -> ``QuantizeLinear``. Weights and biases are ``DequantizeLinear`` of integer initializers.
* any of these two followed by an integer ``Clip`` (``Q -> Clip -> DQ``, the form export_qdq
  writes for points below 8 bits stored in 8): the Clip's bounds become the step's integer bounds
  and the step is named like the Clip's output;
* ``move``: MaxPool/Flatten/Reshape/Concat applied directly to integer tensors (no DQ/Q around);
  the output keeps the input's scale and zero point and is named like the ONNX tensor.
* ``acc``: a Conv/Gemm/MatMul of DequantizeLinear inputs whose float output is a graph output
  (logits left unquantized): its int32 accumulator, of scale ``s_x * s_w``, named like that output.

Any other float op, or an op the walk cannot place in one of these patterns, is refused with a
:class:`UserInputError` naming the op and its node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import UserInputError
from ..reading import load_onnx
from .requant import QTYPES, QType

CORE_OPS = {"Conv", "Gemm", "MatMul", "Add", "MaxPool", "AveragePool", "GlobalAveragePool",
            "ReduceMean", "Concat", "Flatten", "Reshape"}
MOVE_OPS = {"MaxPool", "Flatten", "Reshape", "Concat"}
ACC_OPS = {"Conv", "Gemm", "MatMul"}
ACTIVATIONS = {"Relu", "Clip"}
_ONNX_QTYPES = {TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.INT4: "int4",
                TensorProto.UINT4: "uint4", TensorProto.INT16: "int16", TensorProto.UINT16: "uint16",
                TensorProto.INT32: "int32"}


@dataclass
class QParams:
    """Scale, zero point, element type and axis of one QuantizeLinear/DequantizeLinear node."""

    scale: np.ndarray  # float32, scalar or 1-D (per channel)
    zero_point: np.ndarray  # int64, same shape as scale
    qtype: QType
    axis: int | None  # None: per tensor


@dataclass
class Operand:
    """A core-op input seen through its DequantizeLinear: an integer tensor and its parameters."""

    tensor: str
    params: QParams
    const: np.ndarray | None = None  # int64 values when the integer tensor is an initializer
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # kernels' data derived from const


@dataclass
class Step:
    kind: str  # "input" | "requant" | "move" | "acc"
    out: str
    op: str
    node: str
    out_params: QParams | None
    operands: list[Operand] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    clamp: tuple[float, float] = (-np.inf, np.inf)
    source: str | None = None  # float graph input (kind "input") or integer input (kind "move")
    core: onnx.NodeProto | None = None
    qclamp: tuple[int, int] | None = None  # an integer Clip after the QuantizeLinear (stored integers)


def load_model(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    return load_onnx(Path(model_or_path))  # regular file, bounded, external data checked (reading.py)


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node '{node.name or node.output[0]}'"


class GraphReader:
    """Walks the nodes once, in their (topological) order, and builds the list of steps."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self.init_types = {i.name: i.data_type for i in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.float_inputs = {i.name for i in self.graph.input if i.name not in self.consts}
        self.graph_outputs = {o.name for o in self.graph.output}
        self.integer: dict[str, QParams | None] = {}  # integer tensors known so far
        self.readers: dict[str, int] = {}
        for node in self.graph.node:
            for name in node.input:
                self.readers[name] = self.readers.get(name, 0) + 1
        self.covered: set[int] = set()
        self.steps: list[Step] = []

    def read(self) -> list[Step]:
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            self._visit(node)
        for node in self.graph.node:
            if id(node) not in self.covered:
                raise UserInputError(f"unsupported op in the integer graph: {_node_label(node)} is not "
                                     "between DequantizeLinear and QuantizeLinear in a supported pattern")
        return self.steps

    def _visit(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if op == "Constant":
            self.consts[node.output[0]] = numpy_helper.to_array(attributes(node)["value"])
            self.covered.add(id(node))
        elif op == "QuantizeLinear":
            self._quantize(node)
        elif op == "DequantizeLinear":
            src = node.input[0]
            if src not in self.integer and src not in self.consts:
                raise UserInputError(f"{_node_label(node)} reads '{src}', which is not an integer tensor "
                                     "the reference knows (a QuantizeLinear output or an initializer)")
            self.covered.add(id(node))
        elif op == "Clip" and node.input[0] in self.integer:
            self._integer_clip(node)
        elif op in MOVE_OPS and node.input[0] in self.integer:
            self._move(node)
        elif op in ACC_OPS and node.output[0] in self.graph_outputs:
            operands = [self._operand(self._dq_of(node, i)) for i in self._data_inputs(node)]
            self.covered.add(id(node))
            self.steps.append(Step("acc", node.output[0], op, node.name or node.output[0], None, operands,
                                   self._attrs(node), core=node))

    def params(self, node: onnx.NodeProto) -> QParams:
        a = attributes(node)
        if a.get("block_size", 0):
            raise UserInputError(f"blocked quantization is not supported: {_node_label(node)}")
        scale = np.asarray(self._const(node, 1), dtype=np.float32)
        if len(node.input) > 2 and node.input[2]:
            zp_raw = self._const(node, 2)
            etype = self.init_types.get(node.input[2]) or _np_to_onnx(zp_raw.dtype)
            zp = np.asarray(zp_raw).astype(np.int64)
        else:
            etype = a.get("output_dtype", 0) or TensorProto.UINT8
            zp = np.zeros(scale.shape, dtype=np.int64)
        if node.op_type == "DequantizeLinear" and node.input[0] in self.consts:
            etype = self.init_types.get(node.input[0], etype)
        if etype not in _ONNX_QTYPES:
            raise UserInputError(f"unsupported quantized element type {TensorProto.DataType.Name(etype)} "
                                 f"in {_node_label(node)}")
        axis = a.get("axis", 1) if scale.ndim == 1 and scale.size > 1 else None
        if axis is None:
            scale, zp = scale.reshape(()), np.asarray(zp).reshape(())
        return QParams(scale, np.broadcast_to(zp, scale.shape).copy(), QTYPES[_ONNX_QTYPES[etype]], axis)

    def _const(self, node: onnx.NodeProto, idx: int) -> np.ndarray:
        name = node.input[idx]
        if name not in self.consts:
            raise UserInputError(f"{_node_label(node)}: input '{name}' must be a constant initializer")
        return self.consts[name]

    def _quantize(self, node: onnx.NodeProto) -> None:
        out_params = self.params(node)
        if out_params.axis is not None:
            raise UserInputError(f"per-channel activation quantization is not supported: {_node_label(node)}")
        src = node.input[0]
        self.covered.add(id(node))
        clipped, clamp = self._float_input(src)
        if clipped is not None:
            step = Step("input", node.output[0], "QuantizeLinear", node.name or node.output[0], out_params,
                        clamp=clamp, source=clipped)
        else:
            step = self._trace(node, src, out_params)
        self.integer[node.output[0]] = out_params
        self.steps.append(step)

    def _activations(self, src: str) -> tuple[str, list[onnx.NodeProto], float, float]:
        """Back from ``src`` through Relu/Clip nodes: the tensor they act on, the nodes (last
        first) and the bounds they impose together."""
        lo, hi = -np.inf, np.inf
        chain = []
        node = self.producer.get(src)
        while node is not None and node.op_type in ACTIVATIONS:
            a_lo, a_hi = self._activation_bounds(node)
            lo, hi = float(np.clip(a_lo, lo, hi)), float(np.clip(a_hi, lo, hi))
            chain.append(node)
            src = node.input[0]
            node = self.producer.get(src)
        return src, chain, lo, hi

    def _float_input(self, src: str) -> tuple[str | None, tuple[float, float]]:
        """The float graph input ``src`` is, or comes from through Relu/Clip nodes (a 4-bit input
        in an 8-bit container), with their bounds; None otherwise."""
        origin, chain, lo, hi = self._activations(src)
        if origin not in self.float_inputs:
            return None, (lo, hi)
        self.covered.update(id(n) for n in chain)
        return origin, (lo, hi)

    def _trace(self, q_node: onnx.NodeProto, src: str, out_params: QParams) -> Step:
        origin, chain, lo, hi = self._activations(src)
        self.covered.update(id(n) for n in chain)
        last_act = chain[0] if chain else None
        node = self.producer.get(origin)
        if node is None:
            raise UserInputError(f"{_node_label(q_node)} quantizes a tensor no node produces")
        if node.op_type == "DequantizeLinear":
            shown = last_act or q_node
            core, op, operands = None, (last_act.op_type if last_act else "Identity"), [self._operand(node)]
        elif node.op_type in CORE_OPS:
            shown, core, op = node, node, node.op_type
            operands = [self._operand(self._dq_of(node, i)) for i in self._data_inputs(node)]
            self.covered.add(id(node))
        else:
            raise UserInputError(f"unsupported op in the integer graph: {_node_label(node)}")
        name = shown.name or shown.output[0]
        return Step("requant", q_node.output[0], op, name, out_params, operands, self._attrs(core),
                    (lo, hi), core=core)

    def _attrs(self, node: onnx.NodeProto | None) -> dict:
        if node is None:
            return {}
        attrs = attributes(node)
        if node.op_type == "Reshape":
            attrs["shape"] = np.asarray(self._const(node, 1)).astype(np.int64)
        if node.op_type == "ReduceMean" and len(node.input) > 1 and node.input[1]:  # opset 18: an input
            attrs["axes"] = np.asarray(self._const(node, 1)).astype(np.int64).reshape(-1)
        return attrs

    def _activation_bounds(self, node: onnx.NodeProto) -> tuple[float, float]:
        if node.op_type == "Relu":
            return 0.0, np.inf
        a = attributes(node)
        lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
        if len(node.input) > 1 and node.input[1]:
            lo = float(np.asarray(self._const(node, 1)))
        if len(node.input) > 2 and node.input[2]:
            hi = float(np.asarray(self._const(node, 2)))
        return float(lo), float(hi)

    def _data_inputs(self, node: onnx.NodeProto) -> list[int]:
        if node.op_type in ("Reshape", "ReduceMean"):
            return [0]
        return [i for i, name in enumerate(node.input) if name]

    def _dq_of(self, node: onnx.NodeProto, idx: int) -> onnx.NodeProto:
        dq = self.producer.get(node.input[idx])
        if dq is None or dq.op_type != "DequantizeLinear":
            why = ("a Conv output left in float before a residual Add, OpenVINO's placement: files of "
                   "export --target openvino and of finetune --target openvino runs have no pure-integer "
                   "reference" if dq is not None and dq.op_type == "Conv" and node.op_type == "Add"
                   else "a float tensor inside the integer graph")
            raise UserInputError(f"{_node_label(node)}: input '{node.input[idx]}' does not come from a "
                                 f"DequantizeLinear ({why})")
        return dq

    def _operand(self, dq: onnx.NodeProto) -> Operand:
        params = self.params(dq)
        const = self.consts.get(dq.input[0])
        values = None if const is None else np.asarray(const).astype(np.int64)
        return Operand(dq.input[0], params, values)

    def _integer_clip(self, node: onnx.NodeProto) -> None:
        """``Q -> Clip -> DQ``: a Clip of integers, sole reader of a step's output, becomes that
        step's integer bounds (in stored units, zero point included); the step now produces the
        Clip's output."""
        src = node.input[0]
        step = next((s for s in reversed(self.steps) if s.out == src), None)
        if step is None or self.readers.get(src, 0) != 1 or src in self.graph_outputs:
            raise UserInputError(f"{_node_label(node)} clips integer tensor '{src}': supported only as the sole "
                                 "reader of a QuantizeLinear output")
        params = self.integer[src]
        lo, hi = step.qclamp or (params.qtype.qmin, params.qtype.qmax)
        if len(node.input) > 1 and node.input[1]:
            lo = max(lo, int(np.asarray(self._const(node, 1))))
        if len(node.input) > 2 and node.input[2]:
            hi = min(hi, int(np.asarray(self._const(node, 2))))
        step.qclamp, step.out = (lo, hi), node.output[0]
        self.integer[node.output[0]] = params
        self.covered.add(id(node))

    def _move(self, node: onnx.NodeProto) -> None:
        data = node.input if node.op_type == "Concat" else node.input[:1]
        params = [self.integer.get(name) for name in data]
        first = params[0]
        if any(p is None or not _same(p, first) for p in params):
            raise UserInputError(f"{_node_label(node)} joins integer tensors with different scales or zero "
                                 "points without requantization")
        self.covered.add(id(node))
        self.integer[node.output[0]] = first
        self.steps.append(Step("move", node.output[0], node.op_type, node.name or node.output[0], first,
                               attrs=self._attrs(node), source=node.input[0], core=node))


def _same(a: QParams, b: QParams) -> bool:
    return a.qtype == b.qtype and np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point)


def _np_to_onnx(dtype) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def read_steps(model: onnx.ModelProto) -> list[Step]:
    """The integer steps of a QDQ graph, in graph order (see the module docstring)."""
    return GraphReader(model).read()
