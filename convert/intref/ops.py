"""Core ops of a QDQ step, in integers: each returns an :class:`Accum`, the exact pre-requantization
value as a sum of integer terms times float32 scale factors (``value = sum(term * prod(factors))``).

Nothing here rounds: requantization (:mod:`.execute`) turns an ``Accum`` into the output integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserInputError
from . import kernels
from .graph import Operand, Step


@dataclass
class Term:
    values: np.ndarray  # int64
    factors: list[np.ndarray]  # float32 scales, each broadcastable to ``values``


@dataclass
class Accum:
    terms: list[Term]
    divisor: np.ndarray | None = None  # average pooling: element counts
    abs_sum: np.ndarray | None = None  # bound on any partial sum of a product accumulation
    concat_axis: int | None = None  # Concat: the terms are requantized one by one, then joined


def _fail(step: Step, why: str) -> UserInputError:
    return UserInputError(f"unsupported {step.op} node '{step.node}': {why}")


def activation(op: Operand, env: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(x - z_x, s_x)`` of a per-tensor operand (an activation or a constant)."""
    if op.params.axis is not None:
        raise UserInputError(f"per-channel quantization of '{op.tensor}' is only supported for weights")
    values = op.const if op.const is not None else env[op.tensor].astype(np.int64)
    return values - op.params.zero_point, op.params.scale


def weight(step: Step, op: Operand, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``(w - z_w, s_w)`` with per-channel scales shaped to broadcast along ``channel_axis``."""
    if op.const is None:
        raise _fail(step, f"weight '{op.tensor}' is not an initializer")
    if ("offset", channel_axis) in op.cache:
        return op.cache[("offset", channel_axis)]
    w = op.const
    scale, zp = op.params.scale, op.params.zero_point
    if op.params.axis is not None:
        if op.params.axis % w.ndim != channel_axis:
            raise _fail(step, f"weight '{op.tensor}' is quantized per channel on axis {op.params.axis}, "
                        f"not on its output-channel axis {channel_axis}")
        shape = [-1 if a == channel_axis else 1 for a in range(w.ndim)]
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    op.cache[("offset", channel_axis)] = (w - zp if np.any(zp) else w), scale
    return op.cache[("offset", channel_axis)]


def _bias(step: Step, op: Operand, s_x: np.ndarray, s_w: np.ndarray, n_out: int) -> np.ndarray:
    """The int32 bias, whose scale must be ``float32(s_x * s_w)`` (per channel)."""
    if op.const is None or np.any(op.params.zero_point != 0):
        raise _fail(step, f"bias '{op.tensor}' must be an int32 initializer with zero point 0")
    expected = (np.float32(s_x) * np.asarray(s_w, dtype=np.float32)).reshape(-1)
    got = op.params.scale.reshape(-1)
    if got.size != expected.size and 1 in (got.size, expected.size):
        got, expected = np.broadcast_arrays(got, expected)
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-6, atol=0):
        raise _fail(step, f"bias '{op.tensor}' scale is not input scale × weight scale")
    return np.broadcast_to(op.const.reshape(-1), (n_out,))


def _pool_attrs(step: Step, ndim: int):
    a = step.attrs
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise _fail(step, "auto_pad is not supported (write explicit pads)")
    if ndim != 4:
        raise _fail(step, "only 2-D (NCHW) tensors are supported")
    kernel = tuple(a["kernel_shape"]) if "kernel_shape" in a else None
    return (kernel, tuple(a.get("strides", (1, 1))), tuple(a.get("pads", (0, 0, 0, 0))),
            tuple(a.get("dilations", (1, 1))))


def conv(step: Step, env) -> Accum:
    x, s_x = activation(step.operands[0], env)
    w, s_w = weight(step, step.operands[1], 0)
    kernel, strides, pads, dilations = _pool_attrs(step, x.ndim)
    group = int(step.attrs.get("group", 1))
    if x.shape[1] != w.shape[1] * group or w.shape[0] % group:
        raise _fail(step, f"input of {x.shape[1]} channels does not fit weight {list(w.shape)}, group {group}")
    acc, abs_sum = kernels.conv2d(x, w, strides, pads, dilations, group, step.operands[1].cache)
    s_w = s_w.reshape(1, -1, 1, 1) if s_w.ndim else s_w
    if len(step.operands) > 2:
        b = _bias(step, step.operands[2], s_x, s_w, acc.shape[1]).reshape(1, -1, 1, 1)
        acc, abs_sum = acc + b, abs_sum + np.abs(b)
    return Accum([Term(acc, [s_x, s_w])], abs_sum=abs_sum)


def gemm(step: Step, env) -> Accum:
    a = step.attrs
    if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
        raise _fail(step, "transA, alpha and beta other than 0, 1, 1 are not supported")
    x, s_x = activation(step.operands[0], env)
    trans_b = bool(a.get("transB", 0)) if step.op == "Gemm" else False
    w, s_w = weight(step, step.operands[1], 0 if trans_b else 1)
    if w.ndim != 2:
        raise _fail(step, "the weight must be a 2-D initializer")
    w, s_w = (w.T, s_w.T) if trans_b else (w, s_w)
    acc, abs_sum = kernels.matmul(x, w, step.operands[1].cache)
    s_w = s_w.reshape(-1) if s_w.ndim else s_w
    if step.op == "Gemm" and len(step.operands) > 2:
        b = _bias(step, step.operands[2], s_x, s_w, acc.shape[-1])
        acc, abs_sum = acc + b, abs_sum + np.abs(b)
    return Accum([Term(acc, [s_x, s_w])], abs_sum=abs_sum)


def add(step: Step, env) -> Accum:
    terms = [Term(*_term(op, env)) for op in step.operands]
    shape = np.broadcast_shapes(*[t.values.shape for t in terms])
    for t in terms:
        t.values = np.broadcast_to(t.values, shape)
    return Accum(terms)


def _term(op: Operand, env):
    values, scale = activation(op, env)
    return values, [scale]


def pool(step: Step, env) -> Accum:
    x, s_x = activation(step.operands[0], env)
    if step.op in ("GlobalAveragePool", "ReduceMean"):
        axes = _mean_axes(step, x.ndim)
        keep = step.op == "GlobalAveragePool" or bool(step.attrs.get("keepdims", 1))
        sums = x.sum(axis=axes, keepdims=keep, dtype=np.int64)
        count = int(np.prod([x.shape[a] for a in axes]))
        return Accum([Term(sums, [s_x])], divisor=np.full(sums.shape, count, np.int64))
    kernel, strides, pads, dilations = _pool_attrs(step, x.ndim)
    if step.op == "MaxPool":
        return Accum([Term(kernels.max_pool(x, kernel, strides, pads, dilations,
                                            bool(step.attrs.get("ceil_mode", 0))), [s_x])])
    if step.attrs.get("ceil_mode", 0) or dilations != (1, 1):
        raise _fail(step, "ceil_mode and dilations are not supported for average pooling")
    sums, counts = kernels.sum_pool(x, kernel, strides, pads, bool(step.attrs.get("count_include_pad", 0)))
    return Accum([Term(sums, [s_x])], divisor=counts)


def _mean_axes(step: Step, ndim: int) -> tuple[int, ...]:
    if step.op == "GlobalAveragePool":
        if ndim < 3:
            raise _fail(step, "the input needs spatial dimensions")
        return tuple(range(2, ndim))
    axes = step.attrs.get("axes")
    if axes is None or not len(axes):
        if step.attrs.get("noop_with_empty_axes", 0):
            raise _fail(step, "noop_with_empty_axes is not supported")
        return tuple(range(ndim))
    return tuple(sorted(int(a) % ndim for a in axes))


def concat(step: Step, env) -> Accum:
    terms = [Term(*_term(op, env)) for op in step.operands]
    return Accum(terms, concat_axis=int(step.attrs.get("axis", 0)))


def reshape(step: Step, x: np.ndarray) -> np.ndarray:
    """Flatten or Reshape of an integer array (no arithmetic): shared by requant and move steps."""
    if step.op == "Flatten":
        axis = int(step.attrs.get("axis", 1)) % (x.ndim + 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if step.attrs.get("allowzero", 0):
        raise _fail(step, "allowzero=1 is not supported")
    shape = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(step.attrs["shape"])]
    return x.reshape(shape)


def identity_like(step: Step, env) -> Accum:
    """DQ -> [Relu/Clip] -> Q, DQ -> Flatten/Reshape -> Q: one term, the values moved."""
    x, s_x = activation(step.operands[0], env)
    if step.op in ("Flatten", "Reshape"):
        x = reshape(step, x)
    return Accum([Term(x, [s_x])])


CORE = {"Conv": conv, "Gemm": gemm, "MatMul": gemm, "Add": add, "MaxPool": pool, "AveragePool": pool,
        "GlobalAveragePool": pool, "ReduceMean": pool, "Concat": concat, "Flatten": identity_like,
        "Reshape": identity_like}


def evaluate(step: Step, env: dict[str, np.ndarray]) -> Accum:
    return CORE.get(step.op, identity_like)(step, env)


def move(step: Step, env: dict[str, np.ndarray]) -> np.ndarray:
    """MaxPool / Flatten / Reshape / Concat applied directly to integer tensors."""
    x = env[step.source]
    if step.op == "Concat":
        return np.concatenate([env[n] for n in step.core.input], axis=int(step.attrs.get("axis", 0)))
    if step.op == "MaxPool":
        kernel, strides, pads, dilations = _pool_attrs(step, x.ndim)
        y = kernels.max_pool(x.astype(np.int64), kernel, strides, pads, dilations,
                             bool(step.attrs.get("ceil_mode", 0)))
        return y.astype(x.dtype)
    return reshape(step, x)
