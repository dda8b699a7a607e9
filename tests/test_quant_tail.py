"""The classifier tail of activation-quantized files (convert/quantize/tail.py) on hand-built
graphs shaped like the exporter's: MatMul -> Mul(output scale) -> Add(Reshape of the bias, its
shape read from the MatMul's output) folded into one Gemm computing the same logits, anything else
left alone, and the Q/DQ pair on the logits removed so they stay float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from wnconvert.convert.quantize import QuantOptions, quantize
from wnconvert.convert.quantize.tail import dequantized_outputs, fold_linear_tails
from wnconvert.convert.runtime import run_onnx

RNG = np.random.default_rng(0)
W = RNG.uniform(-1, 1, (16, 10)).astype(np.float32)
BIAS = RNG.normal(size=10).astype(np.float32)


def linear_graph(scale=np.float32(0.37), scale_input=False, shape_used=False) -> onnx.ModelProto:
    """x(N,16) -> MatMul(W) -> Mul(scale) -> Add(Reshape(bias, [dim 1 of the MatMul output]))."""
    inits = [numpy_helper.from_array(W, "w"), numpy_helper.from_array(BIAS, "b"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])]
    if scale_input:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    else:
        inits.append(numpy_helper.from_array(np.asarray(scale, np.float32), "s"))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Shape", ["mm"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "one"], ["dim"], name="gather"),
             helper.make_node("Reshape", ["b", "dim"], ["b2"], name="reshape"),
             helper.make_node("Mul", ["mm", "s"], ["scaled"], name="mul"),
             helper.make_node("Add", ["scaled", "b2"], ["logits"], name="add")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])]
    if shape_used:  # the MatMul's shape is also a graph output: the chain cannot go
        outputs.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [2]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


X = RNG.normal(size=(32, 16)).astype(np.float32)


@pytest.mark.parametrize("scale", [np.float32(0.37), RNG.uniform(0.5, 2, 10).astype(np.float32)])
def test_tail_folds_into_one_gemm(tmp_path, scale):
    model = linear_graph(scale)
    onnx.save(model, tmp_path / "a.onnx")
    assert fold_linear_tails(model) == ["mm_gemm"]
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Gemm"]
    assert {i.name for i in model.graph.initializer} == {"mm_gemm_weight", "mm_gemm_bias"}
    onnx.save(model, tmp_path / "b.onnx")
    np.testing.assert_allclose(run_onnx(tmp_path / "b.onnx", X), run_onnx(tmp_path / "a.onnx", X),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(scale_input=True), dict(shape_used=True),
                                    dict(scale=np.ones(3, np.float32))])
def test_other_graphs_are_left_alone(kwargs):
    model = linear_graph(**kwargs)
    before = model.SerializeToString()
    assert fold_linear_tails(model) == []
    assert model.SerializeToString() == before


def test_int8_file_has_float_logits(tmp_path):
    """A W8A8 export of the graph: one Gemm with int8 weights and an int32 bias writes the
    logits in float (no QuantizeLinear after it), close to the float model's."""
    onnx.save(linear_graph(), tmp_path / "f.onnx")
    quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", QuantOptions("int8", per_channel=False), X)
    model = onnx.load(str(tmp_path / "q.onnx"))
    last = next(n for n in model.graph.node if "logits" in n.output)
    assert last.op_type == "Gemm"
    ints = {i.name: i.data_type for i in model.graph.initializer}
    assert TensorProto.INT32 in ints.values() and TensorProto.INT8 in ints.values()
    ref, got = run_onnx(tmp_path / "f.onnx", X), run_onnx(tmp_path / "q.onnx", X)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert len(np.unique(got)) > 200  # not on a uint8 grid (256 levels at most over 320 values)


def test_dequantized_outputs_keeps_inner_pairs():
    """Only the pair in front of a graph output goes; the output name stays."""
    q = ["x", "sc", "zp"]
    nodes = [helper.make_node("QuantizeLinear", q, ["xq"], name="q0"),
             helper.make_node("DequantizeLinear", ["xq", "sc", "zp"], ["xd"], name="d0"),
             helper.make_node("Relu", ["xd"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "sc", "zp"], ["rq"], name="q1"),
             helper.make_node("DequantizeLinear", ["rq", "sc", "zp"], ["y"], name="d1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              [numpy_helper.from_array(np.float32(0.1), "sc"),
                               numpy_helper.from_array(np.uint8(128), "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert dequantized_outputs(model) == ["y"]
    onnx.checker.check_model(model)
    assert [(n.op_type, list(n.output)) for n in model.graph.node] == [
        ("QuantizeLinear", ["xq"]), ("DequantizeLinear", ["xd"]), ("Relu", ["y"])]
