"""The pure-integer reference against onnxruntime (optimizations off and on) on hand-built QDQ graphs."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
import pytest
from qdq_graphs import QdqBuilder, ort_run, tiny_cnn

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.intref import compare_runs, is_power_of_two, run_integer
from wnconvert.convert.intref.requant import round_div, round_shift

P = [2.0 ** -k for k in range(12)]  # P[k] = 2^-k


# onnxruntime (CPU, x86) fuses Q/DQ into its integer kernels (QLinearConv, QGemm, ...) only for uint8
# activations; int8 activations stay DequantizeLinear -> float op -> QuantizeLinear. Both are checked.
# Weights stay within ±63 so that a u8s8 kernel pairing two products in int16 (AVX2 without VNNI)
# cannot saturate: 2·255·63 < 2^15.
WMAX = 63


def _signed(act: str) -> tuple[int, str]:
    """Zero point and type of a tensor holding both signs."""
    return (128 if act == "uint8" else 0), act


def _weights(rng, shape, wmax=WMAX):
    return rng.integers(-wmax, wmax + 1, shape)


def g_conv_relu(rng, act):
    b = QdqBuilder()
    x = b.input([2, 3, 9, 9], P[4], *_signed(act))
    ws = np.asarray([P[5 + c % 2] for c in range(6)], np.float32)
    w, bias = b.weight(_weights(rng, (6, 3, 3, 3)), ws), b.bias(rng.integers(-3000, 3000, 6), P[4] * ws)
    b.q(b.op("Relu", [b.op("Conv", [b.dq(x), w, bias], pads=[1, 1, 1, 1])]), P[3], 0, act)
    return b, rng.normal(size=(2, 3, 9, 9)) * 6


def g_conv_depthwise_clip(rng, act):
    b = QdqBuilder()
    x = b.input([1, 4, 10, 10], P[5], *_signed(act))
    w = b.weight(_weights(rng, (4, 1, 3, 3)), P[6])
    y = b.op("Conv", [b.dq(x), w], group=4, strides=[2, 2], pads=[1, 0, 1, 0])
    lo, hi = b.const("lo", np.float32(0)), b.const("hi", np.float32(3.5))
    b.q(b.op("Clip", [y, lo, hi]), P[5], 0, act)
    return b, rng.normal(size=(1, 4, 10, 10)) * 3


def g_conv_int4(rng, act):
    b = QdqBuilder()
    x = b.input([1, 3, 7, 7], P[3], *_signed(act))
    w = b.weight(_weights(rng, (5, 3, 3, 3), 7), [P[3]] * 5, "int4")
    b.step("Conv", [x], P[2], *_signed(act), extra=[w], dilations=[2, 2], pads=[2, 2, 2, 2])
    return b, rng.normal(size=(1, 3, 7, 7)) * 8


def g_gemm_matmul(rng, act):
    b = QdqBuilder()
    x = b.input([3, 2, 2, 4], P[4], *_signed(act))
    f = b.step("Flatten", [x], P[4], *_signed(act))
    ws = np.asarray([P[5 + c % 3] for c in range(10)], np.float32)
    w, bias = b.weight(_weights(rng, (10, 16)), ws), b.bias(rng.integers(-900, 900, 10), P[4] * ws)
    b.step("Gemm", [f], P[2], *_signed(act), extra=[w, bias], transB=1)
    m = b.step("MatMul", [f], P[3], *_signed(act), extra=[b.weight(_weights(rng, (16, 5)), P[6])])
    b.step("Reshape", [m], P[3], *_signed(act), extra=[b.const("shape", np.asarray([0, 5, 1], np.int64))])
    return b, rng.normal(size=(3, 2, 2, 4)) * 5


def g_add_concat(rng, act):
    b = QdqBuilder()
    x = b.input([2, 4, 5, 5], P[4], *_signed(act))
    y = b.step("Conv", [x], P[3], *_signed(act), extra=[b.weight(_weights(rng, (4, 4, 1, 1)), P[5])])
    s = b.step("Add", [x, y], P[3], *_signed(act))
    b.step("Concat", [s, x, y], P[4], *_signed(act), axis=1)
    three = b.weight(np.full((1, 4, 1, 1), 3), P[2])  # a constant operand of Add
    b.step("Add", [y], P[4], *_signed(act), extra=[three])
    return b, rng.normal(size=(2, 4, 5, 5)) * 4


def g_relu_clip(rng, act):
    b = QdqBuilder()
    x = b.input([2, 3, 4, 4], P[4], *_signed(act))
    b.step("Relu", [x], P[5], 0, act)
    lo, hi = b.const("lo", np.float32(-1.25)), b.const("hi", np.float32(2.0))
    b.step("Clip", [x], P[3], *_signed(act), extra=[lo, hi])
    b.q(b.dq(x), P[2], 125 if act == "uint8" else -3, act)  # requantization alone
    return b, rng.normal(size=(2, 3, 4, 4)) * 5


def g_pools(rng, act):
    b = QdqBuilder()
    x = b.input([2, 3, 9, 9], P[4], *_signed(act))
    b.step("MaxPool", [x], P[4], *_signed(act), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    b.step("MaxPool", [x], P[2], *_signed(act), kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    b.step("MaxPool", [x], P[4], *_signed(act), kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
           pads=[1, 1, 1, 1])  # ceil mode: the window that would start in the right padding is dropped
    b.step("AveragePool", [x], P[4], *_signed(act), kernel_shape=[2, 2], strides=[2, 2])
    b.step("AveragePool", [x], P[5], *_signed(act), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.step("AveragePool", [x], P[5], *_signed(act), kernel_shape=[3, 3], pads=[1, 1, 1, 1],
           count_include_pad=1)
    b.step("GlobalAveragePool", [x], P[6], *_signed(act))
    b.step("ReduceMean", [x], P[5], *_signed(act), extra=[b.const("axes", np.asarray([2, 3], np.int64))])
    b.step("ReduceMean", [x], P[4], *_signed(act), extra=[b.const("axes", np.asarray([-1], np.int64))],
           keepdims=0)
    return b, rng.normal(size=(2, 3, 9, 9)) * 4


def g_moves(rng, act):
    b = QdqBuilder()
    x = b.input([2, 3, 6, 6], P[4], *_signed(act))
    m = b.move("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c = b.move("Concat", [m, m], axis=1)
    f = b.move("Flatten", [c])
    r = b.move("Reshape", [f], extra=[b.const("shape", np.asarray([2, -1, 3], np.int64))])
    b.step("Relu", [r], P[3], 0, act)
    return b, rng.normal(size=(2, 3, 6, 6)) * 4


GRAPHS = [g_moves, g_conv_relu, g_conv_depthwise_clip, g_conv_int4, g_gemm_matmul, g_add_concat, g_relu_clip, g_pools]


@pytest.mark.parametrize("act", ["int8", "uint8"])
@pytest.mark.parametrize("build", GRAPHS, ids=lambda f: f.__name__[2:])
def test_reference_equals_onnxruntime(build, act):
    rng = np.random.default_rng(0)
    b, x = build(rng, act)
    model = b.model()
    run = run_integer(model, x)
    assert run.integer_only and set(run.tensors) == set(b.outputs)
    assert [t.kind for t in run.tensors.values()].count("move") == (4 if build is g_moves else 0)
    for level in ("off", "on"):
        got = ort_run(model, x, level)
        assert compare_runs(run, got) is None, (level, compare_runs(run, got))
    # the fused graph, with only the last tensor read back, agrees as well
    last = b.outputs[-1]
    fused = ort_run(b.model(only=[last]), x, "on")
    np.testing.assert_array_equal(run.tensors[last].values, fused[last])


@pytest.mark.parametrize("act", ["int8", "uint8"])
def test_rounding_ties_and_saturation_at_both_ends(act):
    z, _ = _signed(act)
    b = QdqBuilder()
    x = b.input([1, 1, 16, 16], P[3], z, act)
    y = b.step("Conv", [x], P[4], z, act, extra=[b.weight(np.full((1, 1, 1, 1), 3), P[2])])  # 3x/2
    avg = b.step("AveragePool", [x], P[3], z, act, kernel_shape=[2, 2], strides=[2, 2])  # sum/4
    grid = np.arange(-128, 128, dtype=np.float64) / 8
    grid[:3], grid[-3:] = -40.0, 40.0  # beyond the input range: the input saturates too
    model = b.model()
    run = run_integer(model, grid.reshape(1, 1, 16, 16))
    xq = run.tensors[x].values.astype(np.int64).reshape(-1) - z
    assert xq[:3].tolist() == [-128] * 3 and xq[-3:].tolist() == [127] * 3
    got = run.tensors[y].values.astype(np.int64).reshape(-1) - z
    exact = 3 * xq
    assert (exact % 2 == 1).sum() > 50
    for acc, want in ((3, 2), (9, 4), (15, 8), (-3, -2), (-9, -4), (-15, -8)):  # half to even
        assert got[exact == acc].tolist() == [want]
    assert (got[exact > 2 * 127] == 127).all() and (exact > 2 * 127).sum() > 10
    assert (got[exact < -2 * 128] == -128).all() and (exact < -2 * 128).sum() > 10
    sums = xq.reshape(8, 2, 8, 2).sum(axis=(1, 3))
    assert (sums % 4 == 2).sum() > 0  # average ties
    np.testing.assert_array_equal(run.tensors[avg].values.astype(np.int64).reshape(8, 8) - z, round_div(sums, 4))
    for level in ("off", "on"):
        assert compare_runs(run, ort_run(model, grid.reshape(1, 1, 16, 16), level)) is None, level


def test_integer_rounding_matches_exact_rationals():
    rng = np.random.default_rng(1)
    acc = np.concatenate([rng.integers(-10 ** 6, 10 ** 6, 2000), np.arange(-40, 41)])
    for n in (0, 1, 2, 5, 13):
        want = [round(Fraction(int(a), 2 ** n)) for a in acc]
        assert round_shift(acc, n).tolist() == want
    den = rng.integers(1, 50, acc.size)
    want = [round(Fraction(int(a), int(d))) for a, d in zip(acc, den)]
    assert round_div(acc, den).tolist() == want
    assert round_shift(np.asarray([3, -3]), -2).tolist() == [12, -12]


def test_is_power_of_two_reads_float32_bits():
    assert is_power_of_two(1.0) == 0 and is_power_of_two(0.125) == -3 and is_power_of_two(2.0 ** 20) == 20
    assert is_power_of_two(np.float32(2.0 ** -149)) == -149  # smallest subnormal
    assert is_power_of_two(np.float32(2.0 ** -130)) == -130
    one_up = np.nextafter(np.float32(0.25), np.float32(1))
    one_down = np.nextafter(np.float32(0.25), np.float32(0))
    assert is_power_of_two(one_up) is None and is_power_of_two(one_down) is None
    assert is_power_of_two(np.nextafter(np.float32(2.0 ** -140), np.float32(1))) is None
    for bad in (0.0, -0.5, 3.0, 0.1, float("inf"), float("nan")):
        assert is_power_of_two(bad) is None


def test_non_power_of_two_scales_fall_back_visibly():
    rng = np.random.default_rng(2)
    b = QdqBuilder()
    x = b.input([2, 3, 6, 6], 0.05)
    ws = np.asarray([0.011, 0.013, 0.0125, 0.02], np.float32)
    w, bias = b.weight(rng.integers(-127, 128, (4, 3, 3, 3)), ws), b.bias(rng.integers(-99, 99, 4), 0.05 * ws)
    y = b.q(b.op("Conv", [b.dq(x), w, bias], pads=[1, 1, 1, 1]), 0.3, 3)
    model, xf = b.model(), rng.normal(size=(2, 3, 6, 6)) * 3
    run = run_integer(model, xf)
    t = run.tensors[y]
    assert not t.integer_only and not run.integer_only and t.shift is None
    assert "not a power of two" in t.reason
    assert compare_runs(run, ort_run(model, xf, "on")) is None  # QLinearConv: float32 multiply, rint
    off = ort_run(model, xf, "off")[y].astype(int)  # float Conv: another float rounding order
    assert np.abs(off - t.values).max() <= 1


@pytest.mark.parametrize("act", ["int8", "uint8"])
def test_accumulators_beyond_2_24_are_flagged(act):
    """acc = 127·127·2048 − 2049 = 31.5·2^20 − 1 is odd and above 2^24: float32 rounds it to the tie
    31.5·2^20, which rounds to 32; the exact value rounds to 31. onnxruntime (both levels) is off."""
    b = QdqBuilder()
    x = b.input([1, 2048], P[0], 0, act)
    big = b.step("Gemm", [x], 2.0 ** 20, 0, act, extra=[b.weight(np.full((1, 2048), 127), P[0]),
                                                       b.bias([-2049], P[0])], transB=1)
    small = b.step("Gemm", [x], 2.0 ** 8, 0, act, extra=[b.weight(np.full((1, 2048), 1), P[0])], transB=1)
    model, xf = b.model(), np.full((1, 2048), 127.0)
    run = run_integer(model, xf)
    acc = 127 * 127 * 2048 - 2049
    assert run.tensors[big].max_abs_acc == acc and run.tensors[big].acc_over_2_24
    assert run.tensors[big].values.item() == round(Fraction(acc, 2 ** 20)) == 31
    assert not run.tensors[small].acc_over_2_24 and not run.tensors[small].partial_over_2_24
    assert run.over_2_24() == [big]
    for level in ("off", "on"):
        assert ort_run(model, xf, level)[big].item() == 32, level


FUSED = {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm"}


@pytest.mark.parametrize("act,weights", [("uint8", "int8"), ("int8", "int8"), ("uint8", "int4")])
def test_tiny_cnn_every_tensor_equals_onnxruntime(tmp_path, act, weights):
    b = tiny_cnn(seed=3, act=act, weight_dtype=weights)
    model, last = b.model(), b.outputs[-1]
    rng = np.random.default_rng(4)
    for _ in range(4):
        x = rng.normal(size=(1, 3, 16, 16)) * rng.uniform(0.5, 6)
        run = run_integer(model, x)
        assert run.integer_only and len(run.tensors) == len(b.outputs) == 9
        for level in ("off", "on"):
            assert compare_runs(run, ort_run(model, x, level)) is None, level
        fused = ort_run(b.model(only=[last]), x, "on", tmp_path / "opt.onnx")
        np.testing.assert_array_equal(run.tensors[last].values, fused[last])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    if act == "uint8" and weights == "int8":  # what "on" means here: onnxruntime's integer kernels
        assert FUSED <= ops and "Conv" not in ops, ops
    shifts = [t.shift for t in run.tensors.values() if t.op == "Conv"]
    assert shifts[0] == [7, 8, 9, 7, 8, 9, 7, 8]  # 2^-5 · 2^-(5+c%3) / 2^-3


def test_unsupported_op_is_named():
    b = QdqBuilder()
    x = b.input([1, 4], P[3])
    b.q(b.op("Sigmoid", [b.dq(x)]), P[7], 0, "uint8")
    with pytest.raises(UserInputError, match="Sigmoid node 'sigmoid"):
        run_integer(b.model(), np.zeros((1, 4)))
    b = QdqBuilder()
    x = b.input([1, 4], P[3])
    b.op("Softmax", [b.dq(x)])
    with pytest.raises(UserInputError, match="Softmax node"):
        run_integer(b.model(), np.zeros((1, 4)))


def test_unsupported_patterns_are_named():
    b = QdqBuilder()
    x = b.input([1, 2, 4, 4], P[3])
    w = b.weight(np.ones((2, 2, 1, 1)), P[4])
    b.step("Conv", [x], P[3], extra=[w, b.bias([1, 2], P[6])])  # bias scale is not 2^-3 · 2^-4
    with pytest.raises(UserInputError, match="Conv node 'conv.*bias .* not input scale × weight scale"):
        run_integer(b.model(), np.zeros((1, 2, 4, 4)))
    b = QdqBuilder()
    x = b.input([1, 2, 4, 4], P[3])
    b.step("Conv", [x], P[3], extra=[b.weight(np.ones((2, 2, 1, 1)), [P[4], P[5]], axis=1)])
    with pytest.raises(UserInputError, match="per channel on axis 1, not on its output-channel axis 0"):
        run_integer(b.model(), np.zeros((1, 2, 4, 4)))
    b = QdqBuilder()
    x = b.input([1, 2, 4, 4], P[3])
    b.step("AveragePool", [x], P[3], kernel_shape=[2, 2], auto_pad="SAME_UPPER")
    with pytest.raises(UserInputError, match="AveragePool node .*auto_pad"):
        run_integer(b.model(), np.zeros((1, 2, 4, 4)))


def test_bad_inputs_are_refused(tmp_path):
    b = tiny_cnn()
    with pytest.raises(UserInputError, match="NaN"):
        run_integer(b.model(), np.full((1, 3, 16, 16), np.nan))
    with pytest.raises(UserInputError, match="does not exist"):
        run_integer(tmp_path / "missing.onnx", np.zeros((1, 3, 16, 16)))
    with pytest.raises(UserInputError, match="Conv node"):
        run_integer(b.model(), np.zeros((1, 5, 16, 16)))


@pytest.mark.parametrize("act", ["int8", "uint8"])
def test_unquantized_outputs_are_int32_accumulators(act):
    rng = np.random.default_rng(6)
    b = QdqBuilder()
    x = b.input([2, 3, 6, 6], P[4], *_signed(act))
    ws = np.asarray([P[5], P[6], P[7], P[5]], np.float32)
    conv = b.op("Conv", [b.dq(x), b.weight(_weights(rng, (4, 3, 3, 3)), ws),
                         b.bias(rng.integers(-900, 900, 4), P[4] * ws)])
    f = b.step("Flatten", [b.q(conv, P[3], *_signed(act))], P[3], *_signed(act))
    w_logits = _weights(rng, (5, 64))
    logits = b.op("Gemm", [b.dq(f), b.weight(w_logits, P[6])], transB=1)
    b.float_outputs += [conv, logits]
    model, xf = b.model(), rng.normal(size=(2, 3, 6, 6)) * 4
    run = run_integer(model, xf)
    acc = run.tensors[logits]
    assert acc.kind == "acc" and acc.dtype == "int32" and acc.values.dtype == np.int32
    assert acc.scale == P[3] * P[6] and run.tensors[conv].scale == [float(P[4] * s) for s in ws]
    expected = (run.tensors[f].values.astype(np.int64) - _signed(act)[0]) @ w_logits.T
    np.testing.assert_array_equal(acc.values, expected)
    for level in ("off", "on"):
        got = ort_run(model, xf, level)
        assert compare_runs(run, got) is None, level
        np.testing.assert_array_equal(got[logits], (acc.values * np.float32(acc.scale)).astype(np.float32))


@pytest.mark.parametrize("act", ["int8", "uint8"])
def test_power_of_two_multiplier_between_float_scales_is_a_shift(act):
    """s_x = 0.3 is no power of two, but s_x · s_w / s_y = 0.3 · 2^-6 / (0.3 · 2^-1) = 2^-5 is."""
    rng = np.random.default_rng(8)
    s_x = float(np.float32(0.3))
    b = QdqBuilder()
    x = b.input([2, 3, 6, 6], s_x, *_signed(act))
    y = b.step("Conv", [x], s_x * P[1], *_signed(act), extra=[b.weight(_weights(rng, (4, 3, 3, 3)), P[6])])
    m = b.step("MaxPool", [y], s_x * P[1], *_signed(act), kernel_shape=[2, 2])
    model, xf = b.model(), rng.normal(size=(2, 3, 6, 6)) * 10
    run = run_integer(model, xf)
    assert run.integer_only and run.tensors[y].shift == 5 and run.tensors[m].shift == 0
    # onnxruntime's fused QLinearConv (uint8, "on") multiplies by float32(float32(s_x·s_w)/s_y) = 2^-5
    # exactly: equal. Its float path (DQ -> Conv -> Q) rounds 0.3·k in float32 and may miss a tie by
    # one step: a bit-exact float runtime needs every scale, not only every multiplier, a power of 2.
    for level in ("off", "on"):
        got = ort_run(model, xf, level)
        if level == "on" and act == "uint8":
            assert compare_runs(run, got) is None
        else:
            assert max(np.abs(got[n].astype(int) - t.values.astype(int)).max() for n, t in run.tensors.items()) <= 1


def test_per_channel_activation_is_refused_with_its_node():
    b = QdqBuilder()
    x = b.input([1, 2, 3, 3], P[3])
    s, z = b.const("s", np.asarray([P[3], P[4]], np.float32)), b.const("z", np.zeros(2, np.int8))
    dq = b.op("DequantizeLinear", [x, s, z], axis=1)
    b.q(b.op("MaxPool", [dq], kernel_shape=[2, 2]), P[3])
    with pytest.raises(UserInputError, match="MaxPool node 'maxpool.*per-channel quantization"):
        run_integer(b.model(), np.zeros((1, 2, 3, 3)))
