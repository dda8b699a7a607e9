"""The weight-range check on hand-built ONNX graphs: computed, hidden, quantized and untraceable
weights, files with nothing to check, and the cost of evaluating shared subexpressions."""

import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import wnconvert.convert.onnx_graph as onnx_graph
from wnconvert.cli.main import app
from wnconvert.convert.errors import RangeError, UserInputError
from wnconvert.convert.onnx_ranges import check_unit_range, load_model, weight_ranges

W_SHAPE = [4, 3, 3, 3]


def _unit(shape, seed=0):
    """float32 values in [-1, 1] with max |w| exactly 1."""
    w = np.random.default_rng(seed).uniform(-0.9, 0.9, shape).astype(np.float32)
    w.flat[0] = 1.0
    return w


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _conv_model(nodes, inits, weight, opset=17, extra_inputs=(), graph_nodes_after=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    conv = helper.make_node("Conv", ["x", weight], ["y"], name="the_conv")
    graph = helper.make_graph(list(nodes) + [conv] + list(graph_nodes_after), "g", [x, *extra_inputs], [y],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run_conv(model, w_eff):
    """The Conv in onnxruntime computes with ``w_eff``: the graph really uses that weight."""
    import onnxruntime as ort
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref_model = _conv_model([], [_init("w", w_eff)], "w")
    ref = ort.InferenceSession(ref_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_mul_of_two_constants_of_the_weight_shape_is_evaluated():
    a, b = _unit(W_SHAPE), np.full(W_SHAPE, 1.5, np.float32)
    model = _conv_model([helper.make_node("Mul", ["a", "b"], ["w"], name="hide")],
                        [_init("a", a), _init("b", b)], "w")
    _run_conv(model, a * b)
    [r] = weight_ranges(model)
    assert (r.node, r.initializer, r.via, r.shape, r.max_abs) == ("the_conv", "w", "computed in graph", W_SHAPE, 1.5)
    with pytest.raises(RangeError, match="max\\|w\\|=1.5"):
        check_unit_range([r], "crafted.onnx")


@pytest.mark.parametrize("scale_shape", [[], [4, 1, 1, 1]])
def test_weight_side_scale_checks_the_stored_operand(scale_shape):
    """Mul(stored, scale) with a scalar or per-output-channel scale is the design of scaled.py."""
    model = _conv_model([helper.make_node("Mul", ["scale", "stored"], ["w"])],
                        [_init("stored", _unit(W_SHAPE)), _init("scale", np.full(scale_shape, 1.5, np.float32))], "w")
    [r] = weight_ranges(model)
    assert (r.initializer, r.via, r.max_abs) == ("stored", "weight-side Mul", 1.0)


def test_a_scale_along_another_axis_is_not_a_weight_side_scale():
    scale = np.full([1, 3, 1, 1], 1.5, np.float32)  # per input channel: a second weight, not a scale
    model = _conv_model([helper.make_node("Mul", ["stored", "scale"], ["w"])],
                        [_init("stored", _unit(W_SHAPE)), _init("scale", scale)], "w")
    [r] = weight_ranges(model)
    assert (r.via, r.max_abs) == ("computed in graph", 1.5)


def test_constant_value_floats_and_reshape():
    w = _unit(W_SHAPE) * np.float32(1.5)
    nodes = [helper.make_node("Constant", [], ["flat"], value_floats=w.ravel().tolist()),
             helper.make_node("Constant", [], ["shape"], value_ints=W_SHAPE),
             helper.make_node("Reshape", ["flat", "shape"], ["w"])]
    model = _conv_model(nodes, [], "w")
    _run_conv(model, w)
    [r] = weight_ranges(model)
    assert (r.initializer, r.shape, r.max_abs) == ("flat", [w.size], 1.5)
    assert not r.in_unit_range


def test_conv_inside_if_branches():
    """A Conv in each branch of an If: one weight of the subgraph, one computed from the outer scope."""
    inner_y = helper.make_tensor_value_info("yt", TensorProto.FLOAT, None)
    then_g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w_then"], ["yt"], name="conv_then")], "then", [], [inner_y],
        initializer=[_init("w_then", _unit(W_SHAPE) * np.float32(0.5))])
    else_y = helper.make_tensor_value_info("ye", TensorProto.FLOAT, None)
    else_g = helper.make_graph(
        [helper.make_node("Add", ["a", "a"], ["w_else"]),
         helper.make_node("Conv", ["x", "w_else"], ["ye"], name="conv_else")], "else", [], [else_y])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    graph = helper.make_graph([helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                              "g", [x, cond], [y], initializer=[_init("a", _unit(W_SHAPE, 2) * np.float32(0.75))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ranges = {r.node: r for r in weight_ranges(model)}
    assert set(ranges) == {"conv_then", "conv_else"}
    assert (ranges["conv_then"].via, ranges["conv_then"].max_abs) == ("direct", 0.5)
    assert (ranges["conv_else"].via, ranges["conv_else"].max_abs) == ("computed in graph", 1.5)
    with pytest.raises(RangeError, match="1 weight tensor"):
        check_unit_range(list(ranges.values()), "if.onnx")


def test_untraceable_weights_are_refused_naming_the_node():
    shape = helper.make_tensor_value_info("s", TensorProto.FLOAT, [4, 3, 3, 3])
    random = _conv_model([helper.make_node("RandomNormal", [], ["w"], name="noise", shape=W_SHAPE)], [], "w")
    with pytest.raises(UserInputError, match="the_conv .*cannot be traced.*RandomNormal noise"):
        weight_ranges(random)
    from_input = _conv_model([helper.make_node("Add", ["a", "s"], ["w"], name="mix")],
                             [_init("a", _unit(W_SHAPE))], "w", extra_inputs=[shape])
    with pytest.raises(UserInputError, match="the_conv depends on the graph's input.*Add mix"):
        weight_ranges(from_input)
    custom = _conv_model([helper.make_node("Secret", ["a"], ["w"], name="vendor", domain="com.example")],
                         [_init("a", _unit(W_SHAPE))], "w")
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UserInputError, match="cannot be traced.*Secret vendor"):
        weight_ranges(custom)


def test_attention_matmul_has_no_weight_and_linear_keeps_its_weight():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="linear", transB=1),
             helper.make_node("Transpose", ["h"], ["ht"]),
             helper.make_node("MatMul", ["h", "ht"], ["att"], name="attention"),
             helper.make_node("MatMul", ["table", "w2"], ["tw"], name="table_mlp"),
             helper.make_node("Add", ["att", "tw"], ["y"])]
    inits = [_init("w", _unit([4, 4])), _init("table", np.full([2, 3], 9.0, np.float32)),
             _init("w2", _unit([3, 2]) * np.float32(0.5))]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    got = {(r.node, r.initializer, r.max_abs) for r in weight_ranges(model)}
    assert got == {("linear", "w", 1.0), ("table_mlp", "w2", 0.5)}


@pytest.mark.parametrize("dtype,qmax,opset", [(TensorProto.INT8, 127, 13), (TensorProto.INT4, 7, 21)])
def test_dequantized_weights_are_checked_at_their_dequantized_value(dtype, qmax, opset):
    q = np.random.default_rng(0).integers(-qmax, qmax + 1, W_SHAPE)
    q[:, 0, 0, 0] = qmax
    scale = np.array([1 / qmax, 1 / qmax, 1 / qmax, 1.2 / qmax], np.float32)
    inits = [helper.make_tensor("wq", dtype, W_SHAPE, q.ravel().tolist()), _init("ws", scale),
             helper.make_tensor("wz", dtype, [4], [0, 0, 0, 0])]
    dq = helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0)
    model = _conv_model([dq], inits, "w", opset=opset)
    w_eff = (q * scale.reshape(4, 1, 1, 1)).astype(np.float32)
    _run_conv(model, w_eff)
    [r] = weight_ranges(model)
    assert (r.via, r.initializer, r.max_abs) == ("dequantized", "w", float(np.float32(qmax) * scale[3]))
    assert not r.in_unit_range


def test_qlinearconv_weight_is_dequantized():
    q = np.random.default_rng(0).integers(-127, 128, W_SHAPE).astype(np.int8)
    q[0, 0, 0, 0] = -127
    w_scale = np.array([0.5, 1, 1, 1], np.float32) / 127
    inits = [_init("xs", np.float32(0.1)), _init("xz", np.uint8(128)), _init("wq", q), _init("wsc", w_scale),
             _init("wz", np.zeros(4, np.int8)), _init("ys", np.float32(0.2)), _init("yz", np.uint8(128))]
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, None)
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "wq", "wsc", "wz", "ys", "yz"], ["y"], name="qconv")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    [r] = weight_ranges(model)
    expected = np.abs(q.astype(np.float32) * w_scale.reshape(4, 1, 1, 1)).max()
    assert (r.node, r.via, r.initializer, r.max_abs) == ("qconv", "dequantized", "wq", float(expected))


def test_plain_initializers_are_read_not_evaluated(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("evaluated a plain initializer")
    monkeypatch.setattr(onnx_graph, "ReferenceEvaluator", refuse)
    nodes = [helper.make_node("Transpose", ["w0"], ["w"], perm=[0, 1, 3, 2])]
    [r] = weight_ranges(_conv_model(nodes, [_init("w0", _unit(W_SHAPE))], "w"))
    assert (r.initializer, r.via, r.max_abs) == ("w0", "direct", 1.0)


def test_shared_subexpressions_are_evaluated_once(monkeypatch):
    """300 weights, each computed from the previous one through a node that reads it twice: one
    evaluation of 300 nodes, not one per weight (quadratic) nor one per path (exponential)."""
    calls = []
    real = onnx_graph.ReferenceEvaluator

    def counting(model, **kw):
        calls.append(len(model.graph.node))
        return real(model, **kw)
    monkeypatch.setattr(onnx_graph, "ReferenceEvaluator", counting)
    n = 300
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    nodes, outs = [], []
    for k in range(1, n + 1):
        nodes.append(helper.make_node("Max", [f"w{k - 1}", f"w{k - 1}"], [f"w{k}"]))
        nodes.append(helper.make_node("MatMul", ["x", f"w{k}"], [f"y{k}"], name=f"mm{k}"))
        outs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, None))
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs, initializer=[_init("w0", _unit([4, 4]))]),
                              opset_imports=[helper.make_opsetid("", 17)])
    t = time.perf_counter()
    ranges = weight_ranges(model)
    assert time.perf_counter() - t < 10
    assert calls == [n]
    assert len(ranges) == n and all(r.max_abs == 1.0 and r.via == "computed in graph" for r in ranges)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_files_with_nothing_to_check_are_refused(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    relu_only = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    cases = {
        "zero.onnx": (b"", "empty \\(0 bytes\\)"),
        "garbage.onnx": (b"\xff\xfe not protobuf \x00\x01" * 7, "not a readable ONNX file|no nodes"),
        "empty_model.onnx": (onnx.ModelProto(ir_version=8, producer_name="x").SerializeToString(), "no nodes"),
        "relu.onnx": (relu_only.SerializeToString(), "nothing to check"),
    }
    runner = CliRunner()
    for name, (data, message) in cases.items():
        path = _write(tmp_path / name, data)
        with pytest.raises(UserInputError, match=message):
            weight_ranges(load_model(path))
        r = runner.invoke(app, ["inspect", str(path), "--require-unit-range"])
        assert r.exit_code == 2, (name, r.output)


def test_a_run_with_a_zero_byte_model_is_one_line_exit_2(tmp_path):
    _write(tmp_path / "model.onnx", b"")
    p = subprocess.run([sys.executable, "-m", "wnconvert.cli", "inspect", str(tmp_path), "--require-unit-range"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.splitlines() == [f"wnconvert: error: {tmp_path / 'model.onnx'} is empty (0 bytes), "
                                     "not an ONNX model"]


def test_fp32_and_quantized_exports_pass_with_their_dequantized_values(tmp_path):
    """A real conversion: fp32 weights are read directly; the weights-only int4/int8 files and a
    W8A8 int8 file are checked at their dequantized values, every Conv/Gemm of each file."""
    import torch
    from helpers import randomize
    from torch import nn

    from wnconvert.convert.apply import apply_scheme
    from wnconvert.convert.pipeline import convert
    from wnconvert.convert.quantize import QuantOptions, quantize
    from wnconvert.convert.schemes import SchemeConfig

    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                    nn.Flatten(), nn.Linear(8, 5)))
    apply_scheme(model, SchemeConfig("channel-max"))
    fp32 = convert(model, (3, 12, 12), tmp_path / "model.onnx").onnx_path
    ref = {r.initializer: r for r in weight_ranges(load_model(fp32))}
    assert len(ref) == 3 and {r.via for r in ref.values()} == {"direct"}
    calib = np.random.default_rng(0).standard_normal((8, 3, 12, 12)).astype(np.float32)
    for name, opts, qmax in [("w4.onnx", QuantOptions("int4", act_bits=None), 7),
                             ("w8.onnx", QuantOptions("int8", act_bits=None), 127),
                             ("a8.onnx", QuantOptions("int8"), None)]:
        quantize(fp32, tmp_path / name, opts, calib if qmax is None else None)
        model_q = load_model(tmp_path / name)
        got = weight_ranges(model_q)
        weight_nodes = {n.name for n in model_q.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
        assert {r.node for r in got} == weight_nodes and {r.via for r in got} == {"dequantized"}, name
        if qmax is not None:  # per-channel symmetric max scale: each channel's max is kept
            assert {r.initializer for r in got} == set(ref)
            for r in got:
                assert r.max_abs == pytest.approx(ref[r.initializer].max_abs, rel=1e-6), (name, r)
            check_unit_range(got, name)


def test_a_weight_reshaped_to_one_column_cannot_pass_a_factor_per_element_as_a_scale():
    """Flatten the weight to [N, 1], multiply by an [N, 1] "scale", reshape back: one factor per
    element, more than the Conv's 4 output channels, so it is computed, not a weight-side scale."""
    w = _unit(W_SHAPE)
    nodes = [helper.make_node("Mul", ["stored", "scale"], ["prod"]),
             helper.make_node("Reshape", ["prod", "shape"], ["w"])]
    inits = [_init("stored", w.reshape(-1, 1)), _init("scale", np.full([w.size, 1], 1.5, np.float32)),
             _init("shape", np.array(W_SHAPE, np.int64))]
    model = _conv_model(nodes, inits, "w")
    _run_conv(model, w * np.float32(1.5))
    [r] = weight_ranges(model)
    assert (r.via, r.max_abs) == ("computed in graph", 1.5)
    # the same Mul with one scale per output channel, on the weight as it is read, is a scale
    inits[0], inits[1] = _init("stored", w.reshape(4, -1)), _init("scale", np.full([4, 1], 1.5, np.float32))
    [r] = weight_ranges(_conv_model(nodes, inits, "w"))
    assert (r.via, r.initializer, r.max_abs) == ("weight-side Mul", "stored", 1.0)
