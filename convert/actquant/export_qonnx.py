"""Write the eval-mode fake-quant model as a QONNX file: the QDQ export's network with every
quantization expressed by QONNX's ``Quant`` node (FINN, hls4ml, qonnx).

The walk of the fx graph is the QDQ exporter's (:class:`~.export_qdq._Emitter`); only what a point,
a layer and a pass-through write differs:

* each activation point ``P`` is one ``Quant`` node (``Quant_P``, output ``P_q``, ``doc_string``
  the point): its trained scale, zero point 0, its bit width (2..8, no 8-bit container and no Clip:
  the bit width is the range), ``signed`` 0 after ReLU and 1 elsewhere, ``narrow`` 0 and
  ``rounding_mode`` ``ROUND`` (half to even, what the fake quantizer and ``QuantizeLinear`` do);
* each conv/linear weight is a float initializer holding its grid values ``k_c · s_c`` (the floats
  the QDQ file's ``DequantizeLinear`` produces, bit for bit) behind a ``Quant`` (bit width B, signed,
  ``narrow`` 1: the symmetric grid ``|k| <= 2^(B-1) - 1``) whose per-channel scales have shape
  ``(C, 1, 1, 1)`` (conv) and broadcast on the output-channel axis; a linear layer is
  ``MatMul(x, W^T) + b`` with ``W^T`` of shape ``(in, C)`` and scales ``(C,)`` (again the output
  axis; hls4ml moves such scales below a MatMul, not those of a transposed Gemm weight);
* the bias is a float initializer, the QDQ file's int32 bias times its scale in float32 (the
  floats its ``DequantizeLinear`` produces); BatchNorm is folded exactly as in the QDQ file
  (:func:`~.layers.deployed_parts`);
* max pooling and flatten act on the dequantized floats (the same function as on the integers).

Everything else is standard ONNX (opset 17). ``Quant`` lives in the domain
``qonnx.custom_op.general`` (opset import version 1, qonnx's preferred). The file has a fixed batch
of 1 (FINN and hls4ml take fixed shapes) and its tensor shapes recorded (value_info), so qonnx's
``execute_onnx`` and hls4ml's frontend need no shape inference of their own for ``Quant``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, shape_inference
from torch import fx, nn

from ..artifacts import atomic_path
from .export_qdq import DEFAULT_OPSET, _Emitter, _pass_op, _Value
from .layers import QLayer, deployed_parts
from .quantizer import ActQuantizer

QONNX_DOMAIN = "qonnx.custom_op.general"
QONNX_OPSET = 1
ROUNDING = "ROUND"  # round half to even (numpy.round), as the fake quantizer and QuantizeLinear


@dataclass
class QuantRecord:
    """One ``Quant`` node of the file: what it quantizes and with which parameters."""

    node: str
    tensor: str          # its output
    kind: str            # "activation" | "weight"
    name: str            # the point (activation) or the layer (weight)
    bits: int
    signed: bool
    narrow: bool
    power_of_two: bool   # every scale an exact power of two

    def to_dict(self) -> dict:
        return {"node": self.node, "tensor": self.tensor, "kind": self.kind, "name": self.name,
                "bits": self.bits, "signed": self.signed, "narrow": self.narrow,
                "power_of_two": self.power_of_two}


@dataclass
class QonnxInfo:
    path: Path
    opset: int
    points: list[str]
    quants: list[QuantRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        acts = [q for q in self.quants if q.kind == "activation"]
        weights = [q for q in self.quants if q.kind == "weight"]
        return {"path": str(self.path), "opset": self.opset, "domain": QONNX_DOMAIN,
                "points": self.points, "quant_nodes": len(self.quants),
                "activation_bits": {q.name: q.bits for q in acts},
                "activation_signed": {q.name: q.signed for q in acts},
                "layer_weight_bits": {q.name: q.bits for q in weights},
                "power_of_two": all(q.power_of_two for q in self.quants)}


def _po2(values: np.ndarray) -> bool:
    v = np.asarray(values, np.float32).reshape(-1)
    return bool(np.all(v > 0) and np.all((v.view(np.uint32) & 0x7FFFFF) == 0))


class _QonnxEmitter(_Emitter):
    """The QDQ emitter with points, layers and pass-throughs written as QONNX."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, DEFAULT_OPSET, "int8", "int8")
        self.quants: list[QuantRecord] = []

    def as_float(self, v: _Value, out: str | None = None) -> str:
        return v.float_name  # a Quant's output is already the dequantized float tensor

    def quant(self, name: str, x: str, out: str, scale: np.ndarray, bits: int, signed: bool, narrow: bool,
              kind: str, what: str) -> str:
        s = self.init(f"{name}_scale", np.asarray(scale, np.float32))
        zp = self.init(f"{name}_zeropt", np.zeros(np.shape(scale), np.float32))
        bw = self.init(f"{name}_bitwidth", np.float32(bits))
        self.nodes.append(helper.make_node("Quant", [x, s, zp, bw], [out], name=f"Quant_{name}",
                                           domain=QONNX_DOMAIN, signed=int(signed), narrow=int(narrow),
                                           rounding_mode=ROUNDING))
        self.nodes[-1].doc_string = what
        self.quants.append(QuantRecord(f"Quant_{name}", out, kind, what, int(bits), bool(signed), bool(narrow),
                                       _po2(scale)))
        return out

    def quantize(self, point: str, q: ActQuantizer, v: _Value, feeds_pass: bool) -> _Value:
        out = self.quant(point, self.as_float(v), f"{point}_q", np.float32(q.scale_value()), q.bits, q.signed,
                         False, "activation", point)
        self.info.points.append(point)
        self.info.activation_types[point] = f"{'INT' if q.signed else 'UINT'}{q.bits}"
        return _Value(point=point, float_name=out)

    def layer(self, name: str, q: QLayer, v: _Value) -> str:
        d = deployed_parts(q)
        k = np.asarray(d.weight_int)
        L = 2 ** (d.weight_bits - 1) - 1
        if np.abs(k).max(initial=0) > L:
            raise RuntimeError(f"layer {q.name}: a weight integer lies outside the narrow {d.weight_bits}-bit grid")
        shape = (-1,) + (1,) * (k.ndim - 1)
        scale = np.asarray(d.weight_scale, np.float32).reshape(shape)
        w_float = (k.astype(np.float32) * scale).astype(np.float32)   # DequantizeLinear's floats
        if not q.is_conv:  # MatMul(x, W^T) + b: the scales (out,) broadcast on W^T's last, output axis
            w_float, scale = np.ascontiguousarray(w_float.T), scale.reshape(-1)
        w = self.init(f"{name}_w_float", w_float)
        wq = self.quant(f"{name}_weight", w, f"{name}_w", scale, d.weight_bits, True, True, "weight", q.name)
        self.info.weight_types[q.name] = f"INT{d.weight_bits}"
        b_float = (np.asarray(d.bias_int).astype(np.int32).astype(np.float32)
                   * np.asarray(d.bias_scale, np.float32)).astype(np.float32)
        b = self.init(f"{name}_b_float", b_float)
        return self.layer_nodes(name, q, self.as_float(v), wq, b)

    def linear(self, name: str, x: str, w: str, b: str) -> str:
        """``MatMul(x, W^T) + b`` (``w`` is already ``W^T``, see :meth:`layer`)."""
        y = self.node("MatMul", [x, w], f"{name}_matmul", name)
        return self.node("Add", [y, b], f"{name}_gemm", f"{name}_bias")

    def passthrough(self, n: fx.Node, mod: nn.Module | None, v: _Value) -> _Value:
        op = _pass_op(n, mod)
        if op is None:
            return v
        return _Value(float_name=self.node(op[0], [self.as_float(v)], n.name, n.name, **op[1]))


def _rename(nodes: list[onnx.NodeProto], old: str, new: str) -> None:
    for n in nodes:
        for i, name in enumerate(n.output):
            if name == old:
                n.output[i] = new
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the shapes of its tensors in value_info: onnx's shape inference on a copy in
    which every ``Quant`` is an Identity of its input (its output has its input's shape)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.ClearField("value_info")
    for n in probe.graph.node:
        if n.domain == QONNX_DOMAIN and n.op_type == "Quant":
            del n.input[1:]
            n.op_type, n.domain = "Identity", ""
            del n.attribute[:]
    inferred = shape_inference.infer_shapes(probe, strict_mode=True)
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def export_qonnx(qat_model: fx.GraphModule, path: Path, *, example_shape: tuple[int, ...]) -> QonnxInfo:
    """Write ``qat_model`` (a calibrated/trained :func:`~.prepare.prepare_qat` model) as QONNX:
    input ``input`` (float NCHW, batch 1), output ``logits`` (the last point's Quant output, or the
    float output of a network ending unquantized). Returns what was written, one
    :class:`QuantRecord` per ``Quant`` node."""
    was_training = qat_model.training
    qat_model.eval()
    try:
        with torch.no_grad():
            out_shape = tuple(qat_model(torch.zeros(1, *example_shape[1:])).shape)
        em = _QonnxEmitter(qat_model)
        last = em.run()
    finally:
        qat_model.train(was_training)
    _rename(em.nodes, last, "logits")
    for rec in em.quants:
        if rec.tensor == last:
            rec.tensor = "logits"
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, *example_shape[1:]])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, *out_shape[1:]])
    graph = helper.make_graph(em.nodes, "wnconvert_qonnx", [x], [y], em.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET),
                                                    helper.make_opsetid(QONNX_DOMAIN, QONNX_OPSET)],
                              producer_name="wnconvert.actquant")
    model.ir_version = 8
    model = _with_shapes(model)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return QonnxInfo(path, DEFAULT_OPSET, em.info.points, em.quants)


def quant_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The ``Quant`` nodes of a QONNX model, in graph order."""
    return [n for n in model.graph.node if n.op_type == "Quant" and n.domain in (QONNX_DOMAIN, "onnx.brevitas")]


def is_qonnx(model: onnx.ModelProto) -> bool:
    return bool(quant_nodes(model))
