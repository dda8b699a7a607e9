"""TFLite's int8 arithmetic (convert/tflite/arith.py) and the reference that executes .tflite files
with it (convert/tflite/reference.py), against TensorFlow Lite Micro and LiteRT's reference
kernels on tiny one-operator files written by convert/tflite/flatbuf.py."""

from __future__ import annotations

import numpy as np
import pytest

from wnconvert.convert.tflite import arith, reference
from wnconvert.convert.tflite.flatbuf import TFModel, TFOp, TFTensor, parse, to_bytes

tflm = pytest.importorskip("tflite_micro")


def micro(data: bytes, x: np.ndarray) -> list[np.ndarray]:
    """TFLite Micro on each image of ``x`` (batch 1 files): every graph output, stacked."""
    from tflite_micro import runtime

    it = runtime.Interpreter.from_bytes(data)
    outs = []
    for img in x:
        it.set_input(img[None], 0)
        it.invoke()
        outs.append(it.get_output(0).copy())
        it.reset()
    return np.concatenate(outs)


def litert_ref(data: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_content=data, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    it.allocate_tensors()
    outs = []
    for img in x:
        it.set_tensor(it.get_input_details()[0]["index"], img[None])
        it.invoke()
        outs.append(it.get_tensor(it.get_output_details()[0]["index"]).copy())
    return np.concatenate(outs)


def act(name, shape, scale, zp, dtype="int8"):
    return TFTensor(name, tuple(shape), dtype, None, np.array([scale], np.float32), np.array([zp], np.int64))


def const(name, values, dtype, scale=None, axis=0):
    values = np.asarray(values)
    if scale is None:
        return TFTensor(name, values.shape, dtype, values)
    scale = np.asarray(scale, np.float32).reshape(-1)
    return TFTensor(name, values.shape, dtype, values, scale, np.zeros(scale.shape, np.int64), axis)


def one_op(op, inputs, out, options, consts=()):
    m = TFModel()
    idx = [m.add(t) for t in inputs]
    cidx = [m.add(t) for t in consts]
    o = m.add(out)
    m.ops.append(TFOp(op, idx + cidx, [o], options))
    m.inputs, m.outputs = idx[:1], [o]
    return m


def check(model: TFModel, x: np.ndarray, litert: bool = True) -> np.ndarray:
    data = to_bytes(model)
    ref = reference.run(parse(data), x)[model.outputs[0]]
    got = micro(data, x).astype(np.int64)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    if litert:
        np.testing.assert_array_equal(litert_ref(data, x).astype(np.int64), ref)
    return ref


RNG = np.random.default_rng(0)


def images(n, h, w, c, lo=-128, hi=127):
    return RNG.integers(lo, hi + 1, size=(n, h, w, c)).astype(np.int8)


# -- the arithmetic itself ----------------------------------------------------------------------------

def test_quantize_multiplier_and_double_rounding():
    assert arith.quantize_multiplier(0.25) == (1 << 30, -1)
    assert arith.quantize_multiplier(0.0) == (0, 0)
    q, s = arith.quantize_multiplier(1 - 2 ** -40)  # mantissa rounds up to 2^31: halved, shift + 1
    assert (q, s) == (1 << 30, 1)
    # 0.25 rounds twice: 85 -> 43 -> 22 (a single rounding gives 21)
    assert int(arith.multiply_by_quantized_multiplier(np.array(85), *arith.quantize_multiplier(0.25))) == 22
    assert int(arith.multiply_by_quantized_multiplier(np.array(12927), *arith.quantize_multiplier(2 ** -8))) == 51
    # SaturatingRoundingDoublingHighMul's nudge (1 - 2^30 below zero) sends ties up, not away from zero
    x = np.array([-85, -3, -2, -1, 0, 1, 2, 3, 85])
    y = arith.multiply_by_quantized_multiplier(x, *arith.quantize_multiplier(0.5))
    assert list(y) == [-42, -1, -1, 0, 0, 1, 1, 2, 43]
    assert list(arith.rounding_divide_by_pot(np.array([5, -5, 6, -6, 7, -7]), 1)) == [3, -3, 3, -3, 4, -4]
    assert int(arith.srdhm(np.array(arith.INT32_MIN), np.array(arith.INT32_MIN))) == arith.INT32_MAX
    assert list(arith.rounded_average(np.array([5, -5, 4, -4]), 2)) == [3, -3, 2, -2]


# -- each operator against TFLite Micro (and LiteRT's reference kernels) -------------------------------

@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("po2", [False, True])
@pytest.mark.parametrize("stride, padding, act_fn", [(1, 0, 1), (2, 1, 0), (2, 0, 3)])
def test_conv_matches_micro(depthwise, po2, stride, padding, act_fn):
    cin, cout = 4, 4 if depthwise else 6
    w = RNG.integers(-127, 128, size=(1, 3, 3, cout) if depthwise else (cout, 3, 3, cin)).astype(np.int8)
    s_w = 2.0 ** -RNG.integers(6, 9, size=cout) if po2 else RNG.uniform(0.002, 0.02, size=cout)
    s_x, s_y = (2 ** -4, 2 ** -3) if po2 else (0.0371, 0.121)
    bias = RNG.integers(-3000, 3000, size=cout).astype(np.int32)
    opts = {"Padding": padding, "StrideW": stride, "StrideH": stride, "FusedActivationFunction": act_fn,
            "DilationWFactor": 1, "DilationHFactor": 1}
    if depthwise:
        opts["DepthMultiplier"] = 1
    oh = (9 + stride - 1) // stride if padding == 0 else (9 - 3 + stride) // stride
    m = one_op("DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", [act("x", (1, 9, 9, cin), s_x, 3)],
               act("y", (1, oh, oh, cout), s_y, -5), opts,
               [const("w", w, "int8", s_w, axis=3 if depthwise else 0), const("b", bias, "int32")])
    check(m, images(4, 9, 9, cin))


def test_fully_connected_matches_micro():
    w = RNG.integers(-127, 128, size=(7, 20)).astype(np.int8)
    m = one_op("FULLY_CONNECTED", [act("x", (1, 20), 0.05, -128)], act("y", (1, 7), 0.2, 4),
               {"FusedActivationFunction": 0, "KeepNumDims": False},
               [const("w", w, "int8", RNG.uniform(0.002, 0.02, size=7)),
                const("b", RNG.integers(-500, 500, size=7).astype(np.int32), "int32")])
    x = RNG.integers(-128, 128, size=(30, 20)).astype(np.int8)
    data = to_bytes(m)
    model = parse(data)
    np.testing.assert_array_equal(micro(data, x).astype(np.int64), reference.run(model, x)[m.outputs[0]])
    np.testing.assert_array_equal(litert_ref(data, x).astype(np.int64),  # single rounding (next test)
                                  reference.litert_fully_connected(model, {model.inputs[0]: x})[m.outputs[0]])


def test_litert_reference_fully_connected_rounds_once():
    """LiteRT's reference FULLY_CONNECTED (per-channel) rounds once, TensorFlow Lite Micro twice: on
    enough inputs the two differ somewhere, and each equals its own arithmetic everywhere."""
    rng = np.random.default_rng(7)
    w = rng.integers(-127, 128, size=(10, 64)).astype(np.int8)
    m = one_op("FULLY_CONNECTED", [act("x", (1, 64), 0.037, -3)], act("y", (1, 10), 0.31, 2),
               {"FusedActivationFunction": 0, "KeepNumDims": False},
               [const("w", w, "int8", rng.uniform(0.001, 0.01, size=10)),
                const("b", rng.integers(-900, 900, size=10).astype(np.int32), "int32")])
    x = rng.integers(-128, 128, size=(6000, 64)).astype(np.int8)
    data = to_bytes(m)
    model = parse(data)
    double = reference.run(model, x)[m.outputs[0]]
    single = reference.litert_fully_connected(model, {model.inputs[0]: x})[m.outputs[0]]
    assert np.count_nonzero(single != double) > 0  # the inputs separate the two arithmetics
    np.testing.assert_array_equal(micro(data, x).astype(np.int64), double)
    np.testing.assert_array_equal(litert_ref(data, x).astype(np.int64), single)


@pytest.mark.parametrize("scales", [(0.031, 0.017, 0.04), (2 ** -5, 2 ** -4, 2 ** -4), (0.05, 0.05, 0.02)])
def test_add_matches_micro(scales):
    s1, s2, s_y = scales
    m = TFModel()
    a, b = m.add(act("a", (1, 6, 6, 8), s1, -128)), m.add(act("b", (1, 6, 6, 8), s2, 7))
    y = m.add(act("y", (1, 6, 6, 8), s_y, -128))
    m.ops.append(TFOp("ADD", [a, b], [y], {"FusedActivationFunction": 1}))
    m.inputs, m.outputs = [a, b], [y]
    data = to_bytes(m)
    from tflite_micro import runtime

    xa, xb = images(6, 6, 6, 8), images(6, 6, 6, 8)
    it = runtime.Interpreter.from_bytes(data)
    got = []
    for i in range(len(xa)):
        it.set_input(xa[i:i + 1], 0)
        it.set_input(xb[i:i + 1], 1)
        it.invoke()
        got.append(it.get_output(0).copy())
        it.reset()
    params = arith.AddParams(s1, s2, s_y)
    want = params(xa, -128, xb, 7, -128, *arith.activation_range("RELU", s_y, -128))
    np.testing.assert_array_equal(np.concatenate(got).astype(np.int64), want)


@pytest.mark.parametrize("op, padding", [("MAX_POOL_2D", 0), ("MAX_POOL_2D", 1), ("AVERAGE_POOL_2D", 0),
                                         ("AVERAGE_POOL_2D", 1)])
def test_pool_matches_micro(op, padding):
    oh = 4 if padding == 0 else 3
    m = one_op(op, [act("x", (1, 7, 7, 5), 0.1, -3)], act("y", (1, oh, oh, 5), 0.1, -3),
               {"Padding": padding, "StrideW": 2, "StrideH": 2, "FilterWidth": 3, "FilterHeight": 3,
                "FusedActivationFunction": 0})
    check(m, images(5, 7, 7, 5))


@pytest.mark.parametrize("hw", [4, 7])
@pytest.mark.parametrize("s_x, z_x, s_y, z_y", [(0.07, -128, 0.03, -128), (0.05, 3, 0.05, 3), (2 ** -4, 0, 2 ** -6, 0),
                                                (0.011, -20, 0.2, 7)])
def test_mean_matches_micro(s_x, z_x, s_y, z_y, hw):
    m = one_op("MEAN", [act("x", (1, hw, hw, 16), s_x, z_x)], act("y", (1, 1, 1, 16), s_y, z_y),
               {"KeepDims": True}, [const("axes", np.array([1, 2], np.int32), "int32")])
    check(m, images(30, hw, hw, 16))


def test_pad_reshape_quantize_match_micro():
    m = TFModel()
    x = m.add(TFTensor("x", (1, 3, 3, 2), "float32"))
    q = m.add(act("q", (1, 3, 3, 2), 0.02, -7))
    pads = m.add(const("pads", np.array([[0, 0], [1, 2], [2, 1], [0, 0]], np.int32), "int32"))
    p = m.add(act("p", (1, 6, 6, 2), 0.02, -7))
    r = m.add(act("r", (1, 72), 0.02, -7))
    shape = m.add(const("shape", np.array([1, 72], np.int32), "int32"))
    rq = m.add(act("rq", (1, 72), 0.031, 5))
    y = m.add(TFTensor("y", (1, 72), "float32"))
    m.ops += [TFOp("QUANTIZE", [x], [q]), TFOp("PAD", [q, pads], [p]), TFOp("RESHAPE", [p, shape], [r]),
              TFOp("QUANTIZE", [r], [rq]), TFOp("DEQUANTIZE", [rq], [y])]
    m.inputs, m.outputs = [x], [y]
    data = to_bytes(m)
    xs = (RNG.normal(size=(8, 3, 3, 2)) * 2).astype(np.float32)
    xs[0, 0, 0, 0] = 0.02 * 2.5  # a tie: TFLite rounds it away from zero
    ref = reference.run(parse(data), xs)[y]
    np.testing.assert_array_equal(micro(data, xs), ref)
    np.testing.assert_array_equal(litert_ref(data, xs), ref)
