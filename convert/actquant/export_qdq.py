"""Write the eval-mode fake-quant model as a QDQ ONNX file, emitted node by node from its fx graph.

No exporter and no optimizer sit between the trained integers and the file: every weight
initializer holds the trained grid integers (int8, or INT4 at opset 21 for 4-bit weights) with the
per-channel scales of :func:`~.layers.deployed_parts`; every bias is the int32 that the eval-mode
model uses, with scale ``s_x · s_w``; every quantization point is one ``QuantizeLinear`` (node
``Q_<point>``) and its ``DequantizeLinear`` (``DQ_<point>``), zero point 0, uint8/int8 (uint4/int4
at opset 21 for 4-bit activations; with ``container="int8"`` 4-bit values stay in int8/uint8, like
those of 5 to 7 bits). Activations of 5 to 7 bits (and 4-bit ones stored in 8 bits) are stored in
8-bit types with their grid's range applied in the quantized domain: ``Q_<point>`` (output
``<point>_q8``) -> ``Clip_<point>``, an integer Clip to ``[qmin, qmax]`` plus the zero point (output
``<point>_q``, the point's integers) -> DequantizeLinear. Quantization is monotone, so this holds
the integers a float Clip before the QuantizeLinear gives, and onnxruntime and OpenVINO fuse the
convolutions and adds around it into their integer kernels (a float Clip blocks that). Max pooling and flatten act on
the integers where the storage is
8-bit (onnxruntime has no 4-bit kernels for them; there they act on the dequantized values, which
is the same function). A mixed-precision operation (prepare.FLOAT_OPS) is written in float between
the DequantizeLinear of its inputs and the QuantizeLinear of the point after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn
from torchvision.ops import StochasticDepth

from ..artifacts import atomic_path
from ..errors import UserInputError
from ..quantize.container import check_container, mark_int8_container
from .graph_ops import ADD, AVGPOOL_FN, CAT, float_op, is_passthrough
from .layers import QLayer
from .prepare import act_points, qlayers
from .quantizer import ActQuantizer

INT4_OPSET = 21
DEFAULT_OPSET = 17
_NUMPY_TYPES = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT32: np.int32}
ACT_TYPES = {(8, False): TensorProto.UINT8, (8, True): TensorProto.INT8,
             (4, False): TensorProto.UINT4, (4, True): TensorProto.INT4}


@dataclass
class ExportInfo:
    path: Path
    opset: int
    points: list[str]
    activation_types: dict[str, str] = field(default_factory=dict)   # point -> onnx element type
    weight_types: dict[str, str] = field(default_factory=dict)       # layer -> onnx element type
    # 8-bit-stored points below 8 bits: Q -> integer Clip
    clipped_points: list[str] = field(default_factory=list)
    container: str | None = None     # storage of 4-bit values: int4 | int8 (None: no 4-bit value)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "opset": self.opset, "points": self.points,
                "activation_types": self.activation_types, "weight_types": self.weight_types,
                "clipped_points": self.clipped_points, "container": self.container}


@dataclass
class _Value:
    """An fx value in the file: its integer tensor (when quantized) and/or its float tensor."""

    point: str | None = None
    int_name: str | None = None
    float_name: str | None = None
    qtype: int = TensorProto.UINT8   # element type and zero point of the integers
    zero: int = 0

    @property
    def small(self) -> bool:
        return self.qtype in (TensorProto.UINT4, TensorProto.INT4)


SIGNED_STORAGE = ("offset", "int8")


def _qtype(bits: int, signed: bool, opset: int, storage: str) -> tuple[int, int]:
    """ONNX element type and zero point of a point's integers. ``storage='offset'`` keeps signed
    8-bit-stored points in uint8 with zero point 128 (the same integers ``k``, stored as
    ``k + 128``): onnxruntime then fuses every conv/add, which it does not for every mix of int8
    and uint8 tensors."""
    width = 4 if bits == 4 and opset >= INT4_OPSET else 8
    if signed and width == 8 and storage == "offset":
        return TensorProto.UINT8, 128
    return ACT_TYPES[(width, signed)], 0


class _Emitter:
    def __init__(self, gm: fx.GraphModule, opset: int, storage: str, container: str) -> None:
        self.gm, self.opset, self.storage = gm, opset, storage
        self.four = opset >= INT4_OPSET and container == "int4"   # 4-bit values in 4-bit tensors
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.env: dict[fx.Node, _Value] = {}
        self.dq_count: dict[str, int] = {}
        self.info = ExportInfo(Path(), opset, [])

    def init(self, name: str, array: np.ndarray, dtype: int | None = None) -> str:
        if dtype is None:
            self.inits.append(numpy_helper.from_array(array, name))
        elif dtype in _NUMPY_TYPES:  # raw bytes: a list of ints is slow for millions of weights
            self.inits.append(numpy_helper.from_array(np.asarray(array).astype(_NUMPY_TYPES[dtype]), name))
        else:  # INT4/UINT4: packed two to a byte by make_tensor
            self.inits.append(helper.make_tensor(name, dtype, list(array.shape),
                                                 np.asarray(array).ravel().astype(np.int64).tolist()))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def as_float(self, v: _Value, out: str | None = None) -> str:
        if v.float_name is None or out is not None:
            i = self.dq_count.get(v.point, 0)
            self.dq_count[v.point] = i + 1
            tag = v.point if i == 0 else f"{v.point}_{i}"
            q = self.gm.get_submodule(f"act_quant.{v.point}")
            scale = self.init(f"{tag}_dq_scale", np.float32(q.scale_value()))
            zp = self.init(f"{tag}_dq_zp", np.full((), v.zero, np.int64), v.qtype)
            self.node("DequantizeLinear", [v.int_name, scale, zp], out or f"{tag}_dq", f"DQ_{tag}")
            self.nodes[-1].doc_string = v.point
            if out is not None:
                return out
            v.float_name = f"{tag}_dq"
        return v.float_name

    def run(self) -> str:
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                self.env[n] = _Value(float_name="input")
            elif n.op == "output":
                v = self.env[n.args[0]]
                return self.as_float(v, "logits") if v.int_name else v.float_name
            else:
                self.env[n] = self.emit(n)
        raise RuntimeError("graph without output")

    def emit(self, n: fx.Node) -> _Value:
        mod = self.gm.get_submodule(n.target) if n.op == "call_module" else None
        ins = [self.env[a] for a in n.all_input_nodes]
        if isinstance(mod, ActQuantizer):
            return self.quantize(n.target.split(".", 1)[1], mod, ins[0], self._feeds_pass_op(n))
        if isinstance(mod, QLayer):
            return _Value(float_name=self.layer(n.target.split(".", 1)[1], mod, ins[0]))
        if is_passthrough(self.gm, n):
            return self.passthrough(n, mod, ins[0])
        if n.op == "call_function" and n.target in ADD or n.op == "call_method" and n.target in ("add", "add_"):
            return _Value(float_name=self.node("Add", [self.as_float(v) for v in ins], n.name, n.name))
        if n.op == "call_function" and n.target in CAT:
            axis = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
            return _Value(float_name=self.node("Concat", [self.as_float(v) for v in ins], n.name, n.name, axis=axis))
        if n.op == "call_function" and n.target is torch.nn.functional.relu:
            return _Value(float_name=self.node("Relu", [self.as_float(ins[0])], n.name, n.name))
        if isinstance(mod, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)) or n.target in AVGPOOL_FN:
            return _Value(float_name=self.avgpool(n, mod, self.as_float(ins[0])))
        op = float_op(self.gm, n)
        if op is not None:
            return _Value(float_name=self.float_island(n.name, op, [self.as_float(v) for v in ins]))
        raise UserInputError(f"node {n.name!r} ({n.target}) has no QDQ export")

    def _feeds_pass_op(self, n: fx.Node) -> bool:
        """Whether the point's integers go through max pooling or flatten."""
        for u in n.users:
            mod = self.gm.get_submodule(u.target) if u.op == "call_module" else None
            if is_passthrough(self.gm, u) and _pass_op(u, mod) is not None:
                return True
        return False

    def _width(self, q: ActQuantizer, feeds_pass: bool) -> int:
        """4-bit storage needs opset 21; onnxruntime 1.32's optimizer (level extended and up)
        rewrites a 4-bit DQ -> MaxPool into a MaxPool on the 4-bit tensor, which it then rejects
        as invalid, so a 4-bit point feeding max pooling or flatten is stored in 8 bits (with the
        Clip that keeps its 4-bit range)."""
        return 4 if q.bits == 4 and self.four and not feeds_pass else 8

    def quantize(self, point: str, q: ActQuantizer, v: _Value, feeds_pass: bool) -> _Value:
        width = self._width(q, feeds_pass)
        qtype, zero = _qtype(q.bits if width == 4 else 8, q.signed, self.opset, self.storage)
        s = np.float32(q.scale_value())
        x = self.as_float(v)
        clipped = q.bits not in (8, width)
        scale = self.init(f"{point}_scale", s)
        zp = self.init(f"{point}_zp", np.full((), zero, np.int64), qtype)
        out = self.node("QuantizeLinear", [x, scale, zp], f"{point}_q8" if clipped else f"{point}_q", f"Q_{point}")
        self.nodes[-1].doc_string = point
        if clipped:  # the grid's range in the quantized domain: Q -> integer Clip -> DQ (module docstring)
            lo = self.init(f"{point}_lo", np.full((), q.qmin + zero, np.int64), qtype)
            hi = self.init(f"{point}_hi", np.full((), q.qmax + zero, np.int64), qtype)
            out = self.node("Clip", [out, lo, hi], f"{point}_q", f"Clip_{point}")
            self.nodes[-1].doc_string = point
            self.info.clipped_points.append(point)
        self.info.points.append(point)
        self.info.activation_types[point] = TensorProto.DataType.Name(qtype) + (f"+{zero}" if zero else "")
        return _Value(point=point, int_name=out, qtype=qtype, zero=zero)

    def layer(self, name: str, q: QLayer, v: _Value) -> str:
        d = q.deployed()
        wtype = TensorProto.INT4 if d.weight_bits <= 4 and self.four else TensorProto.INT8
        self.info.weight_types[q.name] = TensorProto.DataType.Name(wtype)
        w = self.init(f"{name}_w_q", d.weight_int, wtype)
        ws = self.init(f"{name}_w_scale", d.weight_scale)
        wdq = self.node("DequantizeLinear", [w, ws], f"{name}_w", f"DQ_{name}_weight", axis=0)
        b = self.init(f"{name}_b_q", d.bias_int.astype(np.int32))
        bs = self.init(f"{name}_b_scale", d.bias_scale)
        bdq = self.node("DequantizeLinear", [b, bs], f"{name}_b", f"DQ_{name}_bias", axis=0)
        return self.layer_nodes(name, q, self.as_float(v), wdq, bdq)

    def layer_nodes(self, name: str, q: QLayer, x: str, w: str, b: str) -> str:
        """Layer ``q`` on the float tensors ``x`` (input), ``w`` (weight) and ``b`` (bias): its Conv or
        linear layer (:meth:`linear`), then its ReLU or ReLU6 (a Clip to [0, 6]); returns the output.
        The QDQ and QONNX emitters differ only in how they make ``w`` and ``b``."""
        if q.is_conv:
            c = q.layer
            pad = [int(p) for p in c.padding]
            y = self.node("Conv", [x, w, b], f"{name}_conv", name, kernel_shape=list(c.kernel_size),
                          strides=list(c.stride), pads=pad + pad, dilations=list(c.dilation), group=c.groups)
        else:
            y = self.linear(name, x, w, b)
        if q.act == "relu":
            return self.node("Relu", [y], f"{name}_relu", f"{name}_relu")
        if q.act == "relu6":
            lo, hi = self.init(f"{name}_clip_lo", np.float32(0)), self.init(f"{name}_clip_hi", np.float32(6))
            return self.node("Clip", [y, lo, hi], f"{name}_relu6", f"{name}_relu6")
        return y

    def linear(self, name: str, x: str, w: str, b: str) -> str:
        """A linear layer: ``Gemm`` with the ``(out, in)`` weight transposed."""
        return self.node("Gemm", [x, w, b], f"{name}_gemm", name, transB=1)

    def float_island(self, name: str, op: str, xs: list[str]) -> str:
        """A mixed-precision operation (prepare.FLOAT_OPS) in float on dequantized inputs; the
        quantizer that follows it in the graph writes its QuantizeLinear."""
        if op in ("hardswish", "sigmoid", "tanh"):
            return self.node({"hardswish": "HardSwish", "sigmoid": "Sigmoid", "tanh": "Tanh"}[op], xs, name, name)
        if op == "hardsigmoid":  # relu6(x + 3) / 6
            return self.node("HardSigmoid", xs, name, name, alpha=1.0 / 6, beta=0.5)
        if op == "mul":
            return self.node("Mul", xs, name, name)
        if op == "silu":
            sig = self.node("Sigmoid", xs, f"{name}_sigmoid", f"{name}_sigmoid")
            return self.node("Mul", [xs[0], sig], name, name)
        if op == "gelu":  # x/2 * (1 + erf(x / sqrt 2)), the exact GELU, in opsets before Gelu
            root2, one, half = (self.init(f"{name}_{k}", np.float32(v)) for k, v in
                                (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5)))
            div = self.node("Div", [xs[0], root2], f"{name}_div", f"{name}_div")
            e = self.node("Erf", [div], f"{name}_erf", f"{name}_erf")
            add = self.node("Add", [e, one], f"{name}_add", f"{name}_add")
            y = self.node("Mul", [xs[0], add], f"{name}_mul", f"{name}_mul")
            return self.node("Mul", [y, half], name, name)
        raise UserInputError(f"node {name!r} ({op}) has no QDQ export")

    def passthrough(self, n: fx.Node, mod: nn.Module | None, v: _Value) -> _Value:
        op = _pass_op(n, mod)
        if op is None:
            return v
        on_int = v.int_name is not None and not v.small
        src = v.int_name if on_int else self.as_float(v)
        out = self.node(op[0], [src], n.name, n.name, **op[1])
        return _Value(v.point, out, qtype=v.qtype, zero=v.zero) if on_int else _Value(float_name=out)

    def avgpool(self, n: fx.Node, mod: nn.Module | None, x: str) -> str:
        if isinstance(mod, nn.AdaptiveAvgPool2d) or n.target is torch.nn.functional.adaptive_avg_pool2d:
            size = mod.output_size if mod is not None else n.args[1]
            if size not in (1, (1, 1), [1, 1]):
                raise UserInputError(f"adaptive average pooling {n.name!r} to {size}: only global pooling exports")
            return self.node("GlobalAveragePool", [x], n.name, n.name)
        if mod is None or mod.divisor_override:
            raise UserInputError(f"average pooling {n.name!r}: only nn.AvgPool2d without divisor_override exports")
        k, s, p = (_pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size), _pair(mod.padding))
        return self.node("AveragePool", [x], n.name, n.name, kernel_shape=k, strides=s, pads=p + p,
                         ceil_mode=int(mod.ceil_mode), count_include_pad=int(mod.count_include_pad))


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _pass_op(n: fx.Node, mod: nn.Module | None) -> tuple[str, dict] | None:
    """The ONNX op for a pass-through node, or None for an identity."""
    if isinstance(mod, (nn.Dropout, nn.Identity, StochasticDepth)) or n.target is torch.nn.functional.dropout:
        return None
    if isinstance(mod, nn.MaxPool2d):
        k, s, p, d = (_pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size), _pair(mod.padding),
                      _pair(mod.dilation))
        return "MaxPool", dict(kernel_shape=k, strides=s, pads=p + p, dilations=d, ceil_mode=int(mod.ceil_mode))
    start = (mod.start_dim if isinstance(mod, nn.Flatten) else
             n.kwargs.get("start_dim", n.args[1] if len(n.args) > 1 else 0))
    end = mod.end_dim if isinstance(mod, nn.Flatten) else n.kwargs.get("end_dim", n.args[2] if len(n.args) > 2 else -1)
    if n.target in ("flatten", torch.flatten) or isinstance(mod, nn.Flatten):
        if start == 1 and end == -1:
            return "Flatten", dict(axis=1)
    raise UserInputError(f"node {n.name!r} ({n.target}) has no QDQ export here (only flatten(x, 1))")


def export_qdq(qat_model: fx.GraphModule, path: Path, *, example_shape: tuple[int, ...],
               opset: int | None = None, signed_storage: str = "offset", container: str = "int4") -> ExportInfo:
    """Write ``qat_model`` (a :func:`~.prepare.prepare_qat` model, calibrated/trained) as QDQ ONNX:
    input ``input`` (float NCHW, dynamic batch), output ``logits``. ``opset`` defaults to 21 when
    any weight or activation has 4 bits stored as such, else 17. ``signed_storage``: ``offset``
    (signed 8-bit points as uint8 with zero point 128, fully fused by onnxruntime) or ``int8``
    (zero point 0). ``container`` (:mod:`..quantize.container`): 4-bit values in INT4/UINT4
    tensors (``int4``) or in 8-bit ones, weights in [-7, 7] and activations behind a Clip to
    their 4-bit range (``int8``: onnxruntime's int8 kernels; the file is marked as such)."""
    if signed_storage not in SIGNED_STORAGE:
        raise UserInputError(f"signed storage must be one of {', '.join(SIGNED_STORAGE)}, not {signed_storage!r}")
    check_container(container)
    four = any(p.bits == 4 for p in act_points(qat_model)) or any(
        q.weight_bits <= 4 for q in qlayers(qat_model))
    opset = opset or (INT4_OPSET if four and container == "int4" else DEFAULT_OPSET)
    if four and container == "int4" and opset < INT4_OPSET and any(q.weight_bits <= 4 for q in qlayers(qat_model)):
        raise UserInputError(f"4-bit weights need opset {INT4_OPSET} (INT4 initializers), not {opset}")
    was_training = qat_model.training
    qat_model.eval()
    try:
        with torch.no_grad():
            out_shape = tuple(qat_model(torch.zeros(1, *example_shape[1:])).shape)
        em = _Emitter(qat_model, opset, signed_storage, container)
        logits = em.run()
    finally:
        qat_model.train(was_training)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *example_shape[1:]])
    y = helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", *out_shape[1:]])
    graph = helper.make_graph(em.nodes, "wnconvert_actquant", [x], [y], em.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="wnconvert.actquant")
    model.ir_version = 10 if opset >= INT4_OPSET else 8
    if four:
        em.info.container = container
        if container == "int8":
            mark_int8_container(model)
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    em.info.path = path
    return em.info
