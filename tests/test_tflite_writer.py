"""The QDQ ONNX -> TFLite writer (convert/tflite/writer.py) on hand-built QDQ graphs: TensorFlow Lite
Micro runs the file equal to the TFLite-arithmetic reference at every tensor, each tensor is within
one step of the ONNX integer network recomputed on TFLite's own inputs, and operators TFLite Micro
lacks are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from qdq_graphs import QdqBuilder

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.intref import run_integer
from wnconvert.convert.tflite import reference
from wnconvert.convert.tflite.flatbuf import parse, to_bytes
from wnconvert.convert.tflite.writer import Writer, qdq_to_tflite
from wnconvert.models.run.tflite_verify import _from_onnx, _micro, local_model_check

pytest.importorskip("tflite_micro")


def network(act: str = "uint8", seed: int = 0, relu_alone: bool = False, groups: int | None = None) -> QdqBuilder:
    """conv+relu -> maxpool (ONNX pads, not TFLite's SAME: a PAD) -> depthwise+relu6 -> 1x1 conv ->
    add(+relu) with the pool -> concat with the depthwise output (another scale: a QUANTIZE) ->
    global average pool -> flatten -> gemm; float (not power-of-two) scales throughout."""
    rng = np.random.default_rng(seed)
    signed = 128 if act == "uint8" else 0
    b = QdqBuilder(opset=17)
    x = b.input([1, 3, 16, 16], 0.031, signed, act)

    def conv(q, cin, cout, k, act_fn, scale, group=1, pad=1):
        ws = rng.uniform(0.002, 0.01, cout).astype(np.float32)
        w = b.weight(rng.integers(-127, 128, (cout, cin // group, k, k)), ws)
        bias = b.bias(rng.integers(-3000, 3000, cout), np.float32(b.scales[q]) * ws)
        y = b.op("Conv", [b.dq(q), w, bias], pads=[pad] * 4, group=group)
        if act_fn == "relu":
            return b.q(b.op("Relu", [y]), scale, 0, act)
        if act_fn == "relu6":
            lo, hi = b.const("lo", np.float32(0)), b.const("hi", np.float32(6))
            return b.q(b.op("Clip", [y, lo, hi]), scale, 0, act)
        return b.q(y, scale, signed, act)

    c1 = conv(x, 3, 8, 3, "relu", 0.043)
    p1 = b.move("MaxPool", [c1], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    d = conv(p1, 8, 8, 3, "relu6", 0.027, group=groups or 8)
    c2 = conv(d, 8, 8, 1, None, 0.061, pad=0)
    if relu_alone:
        a = b.step("Add", [c2, p1], 0.05, signed, act)
        a = b.step("Relu", [a], 0.05, 0, act)
    else:
        a = b.q(b.op("Relu", [b.op("Add", [b.dq(c2), b.dq(p1)])]), 0.052, 0, act)
    cat = b.step("Concat", [a, d], 0.052, 0, act, axis=1)
    g = b.step("GlobalAveragePool", [cat], 0.021, 0, act)
    f = b.move("Flatten", [g])
    ws = rng.uniform(0.002, 0.01, 10).astype(np.float32)
    w = b.weight(rng.integers(-127, 128, (10, 16)), ws)
    bias = b.bias(rng.integers(-500, 500, 10), np.float32(b.scales[f]) * ws)
    b.step("Gemm", [f], 0.09, signed, act, extra=[w, bias], transB=1)
    return b


def _images(n=6):
    return np.random.default_rng(1).normal(size=(n, 3, 16, 16)).astype(np.float32) * 2


@pytest.mark.parametrize("act", ["uint8", "int8"])
def test_file_runs_in_micro_as_the_reference_and_one_step_from_onnx(act):
    onnx_model = network(act).model()
    writer = Writer(onnx_model)
    tf = writer.translate()
    assert [o.op for o in tf.ops] == ["CONV_2D", "PAD", "MAX_POOL_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "ADD",
                                      "QUANTIZE", "CONCATENATION", "MEAN", "RESHAPE", "FULLY_CONNECTED"]
    fused = {tf.tensors[o.outputs[0]].name: o.options.get("FusedActivationFunction") for o in tf.ops}
    # RELU twice and RELU6 once (with int8 at this scale 6.0 is beyond 127 steps: RELU6's clamp is RELU's)
    relu6 = 1 if act == "uint8" else 0
    assert list(fused.values()).count(1) == 3 - relu6 and list(fused.values()).count(3) == relu6
    data = to_bytes(tf)
    model = parse(data)
    x = _images()
    onnx_run = run_integer(onnx_model, x)
    x_in = _from_onnx(onnx_run.tensors[onnx_run.input_name].values, writer.held[onnx_run.input_name]).astype(np.int8)
    env = reference.run(model, x_in)
    micro = _micro(data, x_in, model)
    for i, got in micro.items():
        np.testing.assert_array_equal(got.astype(np.int64), env[i].reshape(got.shape), err_msg=model.tensors[i].name)
    counts, failures = local_model_check(onnx_model, writer, env)
    assert failures == []
    assert set(counts) >= {n for n in onnx_run.tensors if n != onnx_run.input_name}
    assert all(c["max_steps"] <= 1 for c in counts.values())
    # the same integers, shifted: a uint8 tensor becomes int8 with its zero point minus 128
    first = model.tensors[model.inputs[0]]
    assert int(first.zero_point[0]) == (0 if act == "uint8" else 128 - 128)
    np.testing.assert_array_equal(env[model.inputs[0]] + (128 if act == "uint8" else 0),
                                  onnx_run.tensors[onnx_run.input_name].values.transpose(0, 2, 3, 1))


def test_local_check_catches_a_wrong_requantization():
    onnx_model = network().model()
    writer = Writer(onnx_model)
    tf = writer.translate()
    conv = next(t for t in tf.tensors if t.name.startswith("q") and t.shape[-1] == 8 and t.data is None)
    conv.scale = conv.scale * np.float32(0.8)  # the file's output scale no longer the trained one
    model = parse(to_bytes(tf))
    x = _images(2)
    onnx_run = run_integer(onnx_model, x)
    x_in = _from_onnx(onnx_run.tensors[onnx_run.input_name].values, writer.held[onnx_run.input_name]).astype(np.int8)
    _, failures = local_model_check(onnx_model, writer, reference.run(model, x_in))
    assert failures and conv.name in failures[0] and "steps from the trained network" in failures[0]


def test_float_io_edges_run_in_micro():
    onnx_model = network().model()
    tf = qdq_to_tflite(onnx_model, io="float")
    assert tf.ops[0].op == "QUANTIZE" and tf.ops[-1].op == "DEQUANTIZE"
    assert tf.tensors[tf.inputs[0]].dtype == "float32" and tf.tensors[tf.outputs[0]].dtype == "float32"
    data = to_bytes(tf)
    model = parse(data)
    x = np.ascontiguousarray(_images(3).transpose(0, 2, 3, 1))
    env = reference.run(model, x)
    micro = _micro(data, x, model)
    np.testing.assert_array_equal(micro[tf.outputs[0]], env[tf.outputs[0]].reshape(micro[tf.outputs[0]].shape))


def test_grouped_convolution_becomes_a_dense_one_micro_runs():
    onnx_model = network(groups=2).model()
    writer = Writer(onnx_model)
    tf = writer.translate()
    assert len(writer.expanded) == 1 and "DEPTHWISE_CONV_2D" not in [o.op for o in tf.ops]
    data = to_bytes(tf)
    model = parse(data)
    x = _images(3)
    onnx_run = run_integer(onnx_model, x)
    x_in = _from_onnx(onnx_run.tensors[onnx_run.input_name].values, writer.held[onnx_run.input_name]).astype(np.int8)
    env = reference.run(model, x_in)
    for i, got in _micro(data, x_in, model).items():
        np.testing.assert_array_equal(got.astype(np.int64), env[i].reshape(got.shape))
    counts, failures = local_model_check(onnx_model, writer, env)
    assert failures == [] and all(c["max_steps"] <= 1 for c in counts.values())


def test_standalone_relu_is_refused_by_name():
    with pytest.raises(UserInputError, match="Relu node 'relu"):
        qdq_to_tflite(network(relu_alone=True).model())


def test_float_island_is_refused_naming_the_op():
    b = QdqBuilder(opset=17)
    x = b.input([1, 3, 4, 4], 0.05, 0, "int8")
    y = b.op("Sigmoid", [b.dq(x)])
    b.q(y, 0.01, 0, "int8")
    with pytest.raises(UserInputError, match="Sigmoid"):
        qdq_to_tflite(b.model())


def test_damaged_bytes_are_one_user_error():
    data = to_bytes(qdq_to_tflite(network().model()))
    rng = np.random.default_rng(3)
    bad = [data[:len(data) // 2], data[:100], b"", b"not a model at all",
           data[:8] + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()]
    for blob in bad:
        with pytest.raises(UserInputError) as e:
            reference.run(parse(blob, label="x.tflite"), np.zeros((1, 16, 16, 3), np.int8))
        assert "\n" not in str(e.value) and "x.tflite" in str(e.value)
    tf = qdq_to_tflite(network().model())
    tf.ops[1].inputs[0] = len(tf.tensors) + 5  # an operator reading a tensor that does not exist
    with pytest.raises(UserInputError, match="does not exist"):
        parse(to_bytes(tf), label="x.tflite")
