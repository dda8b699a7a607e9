"""Hand-built QDQ ONNX graphs (onnx.helper) and an onnxruntime runner, for the integer-reference tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ELEM = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "int4": TensorProto.INT4,
        "int32": TensorProto.INT32}
NP = {"int8": np.int8, "uint8": np.uint8, "int4": np.int8, "int32": np.int32}
LEVELS = {"off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "on": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


class QdqBuilder:
    """Builds DequantizeLinear -> op -> QuantizeLinear graphs; every Q output is a graph output."""

    def __init__(self, opset: int = 21):
        self.opset = opset
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.qparams: dict[str, tuple[str, str, str]] = {}  # q tensor -> (scale, zp, dtype)
        self.scales: dict[str, float] = {}  # q tensor -> its scale
        self.float_outputs: list[str] = []  # float tensors that leave the graph unquantized
        self.count = 0

    def _name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def const(self, stem: str, values, elem=None) -> str:
        name = self._name(stem)
        arr = np.asarray(values)
        if elem is None:
            self.inits.append(numpy_helper.from_array(arr, name))
        else:
            self.inits.append(helper.make_tensor(name, elem, list(arr.shape), arr.reshape(-1).tolist()))
        return name

    def input(self, shape, scale: float, zp: int = 0, dtype: str = "int8") -> str:
        self.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape)))
        return self.q("x", scale, zp, dtype)

    def q(self, src: str, scale: float, zp: int = 0, dtype: str = "int8") -> str:
        s = self.const("s", np.float32(scale))
        z = self.const("z", np.asarray(zp, NP[dtype]).reshape(()), ELEM[dtype])
        out = self._name("q")
        self.nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [out], name=out))
        self.qparams[out] = (s, z, dtype)
        self.scales[out] = float(np.float32(scale))
        self.outputs.append(out)
        return out

    def dq(self, q: str) -> str:
        s, z, _ = self.qparams[q]
        out = self._name("dq")
        self.nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [out], name=out))
        return out

    def weight(self, ints, scale, dtype: str = "int8", axis: int = 0) -> str:
        ints = np.asarray(ints)
        w = self.const("w", ints, ELEM[dtype])
        scale = np.asarray(scale, np.float32)
        s = self.const("ws", scale)
        z = self.const("wz", np.zeros(scale.shape, NP[dtype]), ELEM[dtype])
        out = self._name("wdq")
        attrs = {"axis": axis} if scale.ndim else {}
        self.nodes.append(helper.make_node("DequantizeLinear", [w, s, z], [out], name=out, **attrs))
        return out

    def bias(self, ints, scale) -> str:
        return self.weight(np.asarray(ints, np.int32), scale, "int32", axis=0)

    def op(self, op_type: str, inputs, **attrs) -> str:
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def step(self, op_type: str, qs, scale: float, zp: int = 0, dtype: str = "int8", extra=(), **attrs) -> str:
        """DQ(each of qs) -> op(..., *extra) -> Q."""
        return self.q(self.op(op_type, [self.dq(q) for q in qs] + list(extra), **attrs), scale, zp, dtype)

    def move(self, op_type: str, qs, extra=(), **attrs) -> str:
        """An op applied directly to integer tensors (no DQ/Q): the output keeps qs[0]'s parameters."""
        out = self.op(op_type, list(qs) + list(extra), **attrs)
        self.qparams[out], self.scales[out] = self.qparams[qs[0]], self.scales[qs[0]]
        self.outputs.append(out)
        return out

    def model(self, only: list[str] | None = None) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(o, ELEM[self.qparams[o][2]], None) for o in (only or self.outputs)]
        outs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in self.float_outputs]
        graph = helper.make_graph(self.nodes, "qdq", self.inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 10
        return model


def ort_run(model: onnx.ModelProto, x: np.ndarray, level: str, optimized_path=None) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS[level]
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"x": x.astype(np.float32)})))


def tiny_cnn(seed: int = 0, act: str = "uint8", weight_dtype: str = "int8") -> QdqBuilder:
    """conv-relu-maxpool-conv-add(residual)-relu-globalavgpool-flatten-gemm, every scale a power of
    two. Weights within ±63 (int8) so that no u8s8 int16 pair sum can saturate in onnxruntime."""
    rng = np.random.default_rng(seed)
    wmax = 7 if weight_dtype == "int4" else 63
    signed = 128 if act == "uint8" else 0
    b = QdqBuilder()
    x = b.input([1, 3, 16, 16], 2.0 ** -5, signed, act)

    def conv(q, cin, cout, relu):
        ws = np.asarray([2.0 ** -(5 + c % 3) for c in range(cout)], np.float32)
        w = b.weight(rng.integers(-wmax, wmax + 1, (cout, cin, 3, 3)), ws, weight_dtype)
        bias = b.bias(rng.integers(-2000, 2000, cout), b.scales[q] * ws)
        y = b.op("Conv", [b.dq(q), w, bias], pads=[1, 1, 1, 1])
        return b.q(b.op("Relu", [y]) if relu else y, 2.0 ** -3, 0 if relu else signed, act)

    c1 = conv(x, 3, 8, relu=True)
    p1 = b.step("MaxPool", [c1], 2.0 ** -3, 0, act, kernel_shape=[2, 2], strides=[2, 2])
    c2 = conv(p1, 8, 8, relu=False)
    a = b.step("Add", [c2, p1], 2.0 ** -3, signed, act)
    r = b.step("Relu", [a], 2.0 ** -3, 0, act)
    g = b.step("GlobalAveragePool", [r], 2.0 ** -4, 0, act)
    f = b.step("Flatten", [g], 2.0 ** -4, 0, act)
    ws = np.full(10, 2.0 ** -6, np.float32)
    w = b.weight(rng.integers(-wmax, wmax + 1, (10, 8)), ws, weight_dtype)
    bias = b.bias(rng.integers(-500, 500, 10), b.scales[f] * ws)
    b.step("Gemm", [f], 2.0 ** -2, signed, act, extra=[w, bias], transB=1)
    return b
