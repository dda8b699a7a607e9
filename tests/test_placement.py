"""convert/quantize/placement.py: the residual Add OpenVINO fuses into a convolution reads that
convolution's float output (no Q/DQ pair between them), on hand-built QDQ graphs; the files for
both targets are checked on a trained run in test_openvino.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.quantize.options import QuantOptions
from wnconvert.convert.quantize.placement import float_residual_convs

C = 4


class Graph:
    def __init__(self):
        self.nodes, self.inits = [], []
        self.add_init("s", np.float32(0.05))
        self.add_init("z", np.uint8(128))

    def add_init(self, name, value):
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))

    def qdq(self, x, name):
        self.nodes += [helper.make_node("QuantizeLinear", [x, "s", "z"], [f"{name}_q"]),
                       helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [f"{name}_dq"])]
        return f"{name}_dq"

    def conv(self, x, name):
        w = np.random.default_rng(len(self.nodes)).normal(size=(C, C, 1, 1)).astype(np.float32)
        self.add_init(f"{name}_w", w)
        self.nodes.append(helper.make_node("Conv", [x, f"{name}_w"], [name]))
        return self.qdq(name, name)

    def model(self, out):
        g = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 3, 3])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, C, 3, 3])], self.inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def residual_graph():
    """x -> block 1: conv a + x; block 2 (a downsample block): conv b + conv c, b before c;
    block 3: conv d whose output a Relu reads too; a bias Add of a constant."""
    g = Graph()
    x = g.qdq("x", "in")
    a = g.conv(x, "a")
    g.nodes.append(helper.make_node("Add", [a, x], ["r1"]))
    r1 = g.qdq("r1", "r1")
    b, c = g.conv(r1, "b"), g.conv(r1, "c")
    g.nodes.append(helper.make_node("Add", [c, b], ["r2"]))
    r2 = g.qdq("r2", "r2")
    d = g.conv(r2, "d")
    g.nodes += [helper.make_node("Add", [d, r2], ["r3"]), helper.make_node("Relu", [d], ["d_relu"]),
                helper.make_node("Add", ["r3", "d_relu"], ["r4"])]
    g.add_init("bias", np.full((1, C, 1, 1), 0.5, np.float32))
    g.nodes.append(helper.make_node("Add", ["r4", "bias"], ["y"]))
    return g.model("y")


def test_float_residual_convs():
    model = residual_graph()
    before = {n.output[0] for n in model.graph.node}
    assert float_residual_convs(model) == ["a", "c"]  # c: the later of the two Convs
    onnx.checker.check_model(model)
    removed = before - {n.output[0] for n in model.graph.node}
    assert removed == {"a_q", "a_dq", "c_q", "c_dq"}
    adds = {n.output[0]: list(n.input) for n in model.graph.node if n.op_type == "Add"}
    assert adds["r1"] == ["a", "in_dq"] and adds["r2"] == ["c", "b_dq"]
    assert adds["r3"] == ["d_dq", "r2_dq"]  # d's output is read twice: kept
    x = np.random.default_rng(0).normal(size=(1, C, 3, 3)).astype(np.float32)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_nothing_to_place_is_left_alone():
    model = residual_graph()
    float_residual_convs(model)
    again = onnx.ModelProto()
    again.CopyFrom(model)
    assert float_residual_convs(again) == [] and again == model


def test_bad_setting():
    with pytest.raises(UserInputError, match="residual_conv must be one of: quantized, float"):
        QuantOptions(residual_conv="fused")
