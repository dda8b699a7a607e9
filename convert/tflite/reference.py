"""The integer reference in TensorFlow Lite's arithmetic: executes a :class:`~.flatbuf.TFModel`
(NHWC, int8 activations) operator by operator in numpy integers, with :mod:`.arith`'s
requantization (Q31 multiplier and shift, two roundings; ADD's three rescalings; average pooling
and MEAN rounding half away from zero). Every tensor it computes is kept, by name.

The reference refuses (``UserInputError``, one line) what it does not execute exactly: weights
with a non-zero zero point, grouped (non-depthwise) convolutions, a CONCATENATION or pooling
whose input and output quantizations differ, float tensors other than the edges of ``--io float``.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserInputError
from . import arith
from .flatbuf import TFModel, TFOp, TFTensor

SAME, VALID = 0, 1
ACTIVATIONS = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6"}


def _fail(op: TFOp, index: int, why: str) -> UserInputError:
    return UserInputError(f"{op.op} operator {index}: {why}")


def _qp(t: TFTensor) -> tuple[float, int]:
    return float(np.asarray(t.scale, np.float32).reshape(-1)[0]), int(np.asarray(t.zero_point).reshape(-1)[0])


def _act(op: TFOp, index: int, out: TFTensor) -> tuple[int, int]:
    kind = ACTIVATIONS.get(int(op.options.get("FusedActivationFunction", 0)))
    if kind is None:
        raise _fail(op, index, f"fused activation {op.options.get('FusedActivationFunction')} is not supported")
    s, z = _qp(out)
    return arith.activation_range(kind, s, z)


def same_padding(size: int, kernel: int, stride: int, dilation: int, padding: int) -> tuple[int, int, int]:
    """TFLite's output size and (before, after) padding of one spatial axis."""
    eff = (kernel - 1) * dilation + 1
    if padding == SAME:
        out = (size + stride - 1) // stride
    else:
        out = (size - eff + stride) // stride
    total = max((out - 1) * stride + eff - size, 0)
    return out, total // 2, total - total // 2


def _windows(x: np.ndarray, kh: int, kw: int, sh: int, sw: int, dh: int, dw: int, padding: int, fill):
    """``(N, OH, OW, KH, KW, C)`` windows of NHWC ``x`` padded with ``fill`` (TFLite's SAME/VALID)."""
    n, h, w, c = x.shape
    oh, pt, pb = same_padding(h, kh, sh, dh, padding)
    ow, pl, pr = same_padding(w, kw, sw, dw, padding)
    padded = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=fill)
    s = padded.strides
    return np.lib.stride_tricks.as_strided(padded, (n, oh, ow, kh, kw, c),
                                           (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]),
                                           writeable=False)


def _spatial(op: TFOp):
    o = op.options
    return (int(o.get("StrideH", 1)), int(o.get("StrideW", 1)), int(o.get("DilationHFactor", 1) or 1),
            int(o.get("DilationWFactor", 1) or 1), int(o.get("Padding", SAME)))


def _weights(op: TFOp, index: int, w: TFTensor) -> np.ndarray:
    if w.data is None:
        raise _fail(op, index, f"weight '{w.name}' is not a constant")
    if not w.quantized or np.any(np.asarray(w.zero_point) != 0):
        raise _fail(op, index, f"weight '{w.name}' must be int8 with zero point 0")
    return w.data.astype(np.int64)


def _bias(op: TFOp, index: int, model: TFModel, n_out: int) -> np.ndarray:
    if len(op.inputs) < 3 or op.inputs[2] < 0:
        return np.zeros(n_out, np.int64)
    b = model.tensors[op.inputs[2]]
    if b.data is None or b.dtype != "int32":
        raise _fail(op, index, f"bias '{b.name}' must be a constant int32 tensor")
    return b.data.astype(np.int64).reshape(-1)


def _requant(op, index, model, acc, x: TFTensor, w: TFTensor, out: TFTensor, axis_size: int,
             single_rounding: bool = False) -> np.ndarray:
    s_x, _ = _qp(x)
    s_w = np.broadcast_to(np.asarray(w.scale, np.float32).reshape(-1), (axis_size,))
    s_y, z_y = _qp(out)
    q, shift = arith.conv_multipliers(s_x, s_w, s_y)
    lo, hi = _act(op, index, out)
    return arith.requantize(acc, q, shift, z_y, lo, hi, single_rounding)


def conv(model: TFModel, op: TFOp, index: int, env) -> np.ndarray:
    x_t, w_t, out = (model.tensors[i] for i in (op.inputs[0], op.inputs[1], op.outputs[0]))
    _, z_x = _qp(x_t)
    x = env[op.inputs[0]].astype(np.int64) - z_x
    w = _weights(op, index, w_t)
    sh, sw, dh, dw, padding = _spatial(op)
    depthwise = op.op == "DEPTHWISE_CONV_2D"
    _, kh, kw, cw = w.shape
    n_out = cw if depthwise else w.shape[0]
    if not depthwise and cw != x.shape[3]:
        raise _fail(op, index, f"input of {x.shape[3]} channels does not fit weight {list(w.shape)} "
                    "(grouped convolutions are not supported)")
    win = _windows(x, kh, kw, sh, sw, dh, dw, padding, 0)
    n, oh, ow = win.shape[:3]
    if depthwise:
        mult = int(op.options.get("DepthMultiplier", 1) or 1)
        if x.shape[3] * mult != cw:
            raise _fail(op, index, f"depth multiplier {mult} does not fit {x.shape[3]} -> {cw} channels")
        src = np.repeat(win, mult, axis=5) if mult > 1 else win  # output channel c reads input c // mult
        acc = np.einsum("nhwijc,ijc->nhwc", src, w[0], dtype=np.int64)
    else:
        cols = win.reshape(n * oh * ow, kh * kw * cw)
        acc = (cols @ w.reshape(n_out, -1).T).reshape(n, oh, ow, n_out)
    acc = acc + _bias(op, index, model, n_out)
    return _requant(op, index, model, acc, x_t, w_t, out, n_out)


def fully_connected(model: TFModel, op: TFOp, index: int, env, single_rounding: bool = False) -> np.ndarray:
    x_t, w_t, out = (model.tensors[i] for i in (op.inputs[0], op.inputs[1], op.outputs[0]))
    _, z_x = _qp(x_t)
    w = _weights(op, index, w_t)
    x = np.asarray(env[op.inputs[0]]).astype(np.int64).reshape(-1, w.shape[1]) - z_x
    acc = x @ w.T + _bias(op, index, model, w.shape[0])
    y = _requant(op, index, model, acc, x_t, w_t, out, w.shape[0], single_rounding)
    return y.reshape(out.shape) if int(np.prod(out.shape)) == y.size else y


def litert_fully_connected(model: TFModel, env: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Each FULLY_CONNECTED output as LiteRT 2.3's reference kernel computes it from the input it
    was given (``env``: LiteRT's own tensors): single rounding (:func:`arith.multiply_single_rounding`)."""
    return {op.outputs[0]: fully_connected(model, op, index, env, single_rounding=True)
            for index, op in enumerate(model.ops) if op.op == "FULLY_CONNECTED" and op.inputs[0] in env}


def add(model: TFModel, op: TFOp, index: int, env) -> np.ndarray:
    a_t, b_t, out = (model.tensors[i] for i in (op.inputs[0], op.inputs[1], op.outputs[0]))
    (s1, z1), (s2, z2), (s_y, z_y) = _qp(a_t), _qp(b_t), _qp(out)
    params = arith.AddParams(s1, s2, s_y)
    lo, hi = _act(op, index, out)
    a, b = np.broadcast_arrays(env[op.inputs[0]], env[op.inputs[1]])
    return params(a, z1, b, z2, z_y, lo, hi)


def _same_quant(op, index, a: TFTensor, b: TFTensor):
    if _qp(a) != _qp(b):
        raise _fail(op, index, f"'{a.name}' and '{b.name}' have different quantization parameters")


def pool(model: TFModel, op: TFOp, index: int, env) -> np.ndarray:
    x_t, out = model.tensors[op.inputs[0]], model.tensors[op.outputs[0]]
    _same_quant(op, index, x_t, out)
    x = env[op.inputs[0]].astype(np.int64)
    o = op.options
    kh, kw = int(o["FilterHeight"]), int(o["FilterWidth"])
    sh, sw, _, _, padding = _spatial(op)
    lo, hi = _act(op, index, out)
    if op.op == "MAX_POOL_2D":
        y = _windows(x, kh, kw, sh, sw, 1, 1, padding, np.iinfo(np.int64).min).max(axis=(3, 4))
    else:
        sums = _windows(x, kh, kw, sh, sw, 1, 1, padding, 0).sum(axis=(3, 4))
        ones = np.ones((1,) + x.shape[1:3] + (1,), np.int64)
        counts = _windows(ones, kh, kw, sh, sw, 1, 1, padding, 0).sum(axis=(3, 4))
        y = arith.rounded_average(sums, np.broadcast_to(counts, sums.shape))
    return np.clip(y, lo, hi)


def mean(model: TFModel, op: TFOp, index: int, env) -> np.ndarray:
    x_t, axes_t, out = (model.tensors[i] for i in (op.inputs[0], op.inputs[1], op.outputs[0]))
    axes = tuple(sorted(int(a) % len(x_t.shape) for a in np.asarray(axes_t.data).reshape(-1)))
    if axes != (1, 2) or len(x_t.shape) != 4:
        raise _fail(op, index, f"only the mean over the spatial axes (1, 2) of a 4-D tensor is supported, not {axes}")
    (s_x, z_x), (s_y, z_y) = _qp(x_t), _qp(out)
    x = env[op.inputs[0]].astype(np.int64) - z_x
    sums = x.sum(axis=axes, keepdims=True)
    count = x.shape[1] * x.shape[2]
    y = arith.mean_requantize(sums, count, s_x, s_y, z_y)
    return y.reshape((x.shape[0],) + tuple(out.shape[1:]))


def pad(model: TFModel, op: TFOp, index: int, env) -> np.ndarray:
    x, pads_t, out = env[op.inputs[0]], model.tensors[op.inputs[1]], model.tensors[op.outputs[0]]
    pads = np.asarray(pads_t.data).astype(np.int64).reshape(-1, 2)
    if pads_t.data is None or np.any(pads < 0) or pads.shape[0] != x.ndim:
        raise _fail(op, index, "paddings must be a constant, non-negative, one pair per axis")
    _, z = _qp(out)
    return np.pad(x, [tuple(p) for p in pads], constant_values=z)


def reshape(model: TFModel, op: TFOp, index: int, env) -> np.ndarray:
    x, out = env[op.inputs[0]], model.tensors[op.outputs[0]]
    shape = (x.shape[0],) + tuple(out.shape[1:])
    if int(np.prod(shape)) != x.size:
        raise _fail(op, index, f"cannot reshape {list(x.shape)} to {list(out.shape)}")
    return x.reshape(shape)


def concatenation(model: TFModel, op: TFOp, index: int, env) -> np.ndarray:
    out = model.tensors[op.outputs[0]]
    for i in op.inputs:
        _same_quant(op, index, model.tensors[i], out)
    lo, hi = _act(op, index, out)
    return np.clip(np.concatenate([env[i] for i in op.inputs], axis=int(op.options.get("Axis", 0))), lo, hi)


def quantize(model: TFModel, op: TFOp, index: int, env) -> np.ndarray:
    x_t, out = model.tensors[op.inputs[0]], model.tensors[op.outputs[0]]
    s_y, z_y = _qp(out)
    if x_t.dtype == "float32":
        return arith.quantize_float(env[op.inputs[0]], s_y, z_y)
    s_x, z_x = _qp(x_t)
    return arith.requantize_int8(env[op.inputs[0]], z_x, s_x, s_y, z_y)


def dequantize(model: TFModel, op: TFOp, index: int, env) -> np.ndarray:
    x_t = model.tensors[op.inputs[0]]
    return arith.dequantize(env[op.inputs[0]], *_qp(x_t))


KERNELS = {"CONV_2D": conv, "DEPTHWISE_CONV_2D": conv, "FULLY_CONNECTED": fully_connected, "ADD": add,
           "MAX_POOL_2D": pool, "AVERAGE_POOL_2D": pool, "MEAN": mean, "PAD": pad, "RESHAPE": reshape,
           "CONCATENATION": concatenation, "QUANTIZE": quantize, "DEQUANTIZE": dequantize}


def check_types(model: TFModel) -> None:
    """Every activation is int8 and quantized, except float32 graph edges next to QUANTIZE /
    DEQUANTIZE (``--io float``)."""
    edges = set()
    for op in model.ops:
        if op.op == "QUANTIZE":
            edges.add(op.inputs[0])
        if op.op == "DEQUANTIZE":
            edges.add(op.outputs[0])
    for op in model.ops:
        for i in list(op.inputs) + list(op.outputs):
            if i < 0:
                continue
            t = model.tensors[i]
            if t.data is not None:
                continue
            if t.dtype == "float32" and i in edges:
                continue
            if t.dtype != "int8" or not t.quantized or np.size(t.scale) != 1:
                raise UserInputError(f"tensor '{t.name}' of {op.op} is {t.dtype}"
                                     f"{'' if t.quantized else ' without quantization'}: the reference "
                                     "runs per-tensor int8 activations only")


def run(model: TFModel, x: np.ndarray) -> dict[int, np.ndarray]:
    """Execute ``model`` on ``x`` (the graph input: int8 NHWC values, or float32 with ``--io
    float``), any batch size; returns every tensor it computed by index (int64, or float32 for a
    DEQUANTIZE output)."""
    check_types(model)
    if len(model.inputs) != 1:
        raise UserInputError(f"the model has {len(model.inputs)} inputs; one is supported")
    in_t = model.tensors[model.inputs[0]]
    x = np.asarray(x)
    if tuple(x.shape[1:]) != tuple(in_t.shape[1:]):
        raise UserInputError(f"input of shape {list(x.shape)} does not fit the model's {list(in_t.shape)}")
    env: dict[int, np.ndarray] = {model.inputs[0]: x if in_t.dtype == "float32" else x.astype(np.int64)}
    for index, op in enumerate(model.ops):
        if any(i >= 0 and i not in env and model.tensors[i].data is None for i in op.inputs):
            raise _fail(op, index, "reads a tensor no earlier operator computed")
        env[op.outputs[0]] = KERNELS[op.op](model, op, index, env)
    return env
