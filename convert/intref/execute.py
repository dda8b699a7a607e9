"""Running the integer steps: requantization of each step's accumulator and the per-tensor record.

Requantization of a step whose value is ``sum_i t_i * S_i`` (``t_i`` integers, ``S_i`` products of
float32 scales) into an output of scale ``s_y`` and zero point ``z_y``:

* every multiplier ``M_i = S_i / s_y`` an exact power of two, ``2^k_i`` (true when every scale is
  one, and also, say, for a MaxPool or Flatten that keeps its input's scale): the terms are aligned
  to the finest one in integers (``acc = sum_i t_i << (k_i - b)``, ``b = min k_i``) and
  ``y = clamp(round_half_even(acc >> n) + z_y)`` with ``n = -b`` (a left shift when ``n < 0``);
  an average divides exactly: ``round_half_even(acc * 2^-n / count)`` in integer rationals.
* otherwise the visible fallback: float32 ``rint(float32(acc) * float32(S / s_y))`` as onnxruntime's
  QLinear kernels do; the tensor is marked ``integer_only=False`` with the reason.

Relu/Clip between the core op and the QuantizeLinear become integer bounds (the quantized Clip
bounds, ``z_y`` for Relu): quantization is monotone, so ``Q(clip(v)) == clip(Q(v), Q(lo), Q(hi))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import QParams, Step
from .ops import Accum, Term
from .requant import QTYPES, float32_requant, quantize_constant, quantize_float, round_div, round_shift, saturate

FLOAT32_EXACT = 2 ** 24
INT32_RANGE = (-(2 ** 31), 2 ** 31 - 1)


@dataclass
class Requant:
    """How one step's output was rescaled, and how large its integers grew before that."""

    shift: int | list[int] | None  # right shift n (y = acc >> n), per channel when it varies
    integer_only: bool
    reason: str
    max_abs_acc: int
    max_abs_partial: int


def _ratio_log2(factors: list[np.ndarray], s_y: np.ndarray) -> np.ndarray | None:
    """``k`` with ``prod(factors) / s_y == 2^k`` exactly (per element), or ``None``.

    The product of two float32 values is exact in float64 (48 significant bits), so comparing the
    float64 mantissas of the product and of ``s_y`` decides the ratio exactly.
    """
    if len(factors) > 2:
        raise ValueError("at most two scale factors per term")
    product = np.float64(1)
    for f in factors:
        product = product * np.asarray(f, dtype=np.float32).astype(np.float64)
    m_in, e_in = np.frexp(product)
    m_out, e_out = np.frexp(np.asarray(s_y, dtype=np.float32).astype(np.float64))
    if not (np.all(m_in == m_out) and np.all(product > 0)):
        return None
    return (e_in - e_out).astype(np.int64)


def _span(values) -> str:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    return f"{v.min():.8g}" if v.min() == v.max() else f"{v.min():.8g}..{v.max():.8g}"


def _float32_product(factors: list[np.ndarray]) -> np.ndarray:
    total = np.float32(1)
    for f in factors:
        total = total * np.asarray(f, dtype=np.float32)
    return total


def _bounds(out: QParams, clamp: tuple[float, float]) -> tuple[int, int]:
    lo, hi = out.qtype.qmin, out.qtype.qmax
    zp = int(out.zero_point)
    if np.isfinite(clamp[0]):
        lo = max(lo, quantize_constant(clamp[0], float(out.scale), zp, out.qtype))
    if np.isfinite(clamp[1]):
        hi = min(hi, quantize_constant(clamp[1], float(out.scale), zp, out.qtype))
    return lo, hi


def _shift_value(n: np.ndarray) -> int | list[int]:
    flat = np.unique(np.asarray(n).reshape(-1))
    return int(flat[0]) if flat.size == 1 else [int(v) for v in np.asarray(n).reshape(-1)]


def _max_abs(a) -> int:
    return int(np.max(np.abs(a))) if np.size(a) else 0


def requantize(terms: list[Term], divisor, abs_sum, out: QParams, clamp) -> tuple[np.ndarray, Requant]:
    """Integer output (int64, saturated, zero point added) of ``terms`` and the record of how."""
    ks = [_ratio_log2(t.factors, out.scale) for t in terms]
    if all(k is not None for k in ks):
        base = np.minimum.reduce(np.broadcast_arrays(*ks)) if len(ks) > 1 else ks[0]
        acc = sum(t.values << (k - base) for t, k in zip(terms, ks))
        n = -base
        if divisor is None:
            q = round_shift(acc, n)
        else:
            q = round_div(acc << np.maximum(-n, 0), divisor << np.maximum(n, 0))
        info = Requant(_shift_value(n), True, "", _max_abs(acc), _max_abs(acc))
    else:
        mults = [_float32_product(t.factors) / np.float32(out.scale) for t in terms]
        q = float32_requant([t.values for t in terms], mults, divisor)
        shown = ", ".join(_span(m) for m in mults)
        info = Requant(None, False, f"requantization multiplier {shown} is not a power of two: "
                       "float32 multiply and round half to even, as onnxruntime does",
                       max(_max_abs(t.values) for t in terms), max(_max_abs(t.values) for t in terms))
    if abs_sum is not None:
        info.max_abs_partial = max(info.max_abs_partial, _max_abs(abs_sum))
    lo, hi = _bounds(out, clamp)
    return saturate(q + int(out.zero_point), lo, hi), info


def quantize_input(x: np.ndarray, out: QParams, clamp: tuple[float, float]) -> np.ndarray:
    """A float graph input quantized like ``QuantizeLinear``, within the integer bounds of a Clip
    before it (a 4-bit input in an 8-bit container)."""
    q = quantize_float(x, float(out.scale), int(out.zero_point), out.qtype)
    return saturate(q, *_bounds(out, clamp))


def requantize_accum(accum: Accum, out: QParams, clamp) -> tuple[np.ndarray, Requant]:
    if accum.concat_axis is None:
        return requantize(accum.terms, accum.divisor, accum.abs_sum, out, clamp)
    parts = [requantize([t], None, None, out, clamp) for t in accum.terms]
    infos = [p[1] for p in parts]
    merged = Requant([i.shift for i in infos] if all(i.integer_only for i in infos) else None,
                     all(i.integer_only for i in infos), "; ".join(i.reason for i in infos if i.reason),
                     max(i.max_abs_acc for i in infos), max(i.max_abs_partial for i in infos))
    return np.concatenate([p[0] for p in parts], axis=accum.concat_axis), merged


def accumulator(accum: Accum) -> tuple[np.ndarray, QParams, Requant]:
    """The int32 accumulator of a product op left unrequantized (a float graph output)."""
    term = accum.terms[0]
    scale = _float32_product(term.factors)
    scale = np.asarray(scale).reshape((1,) * (term.values.ndim - np.ndim(scale)) + np.shape(scale))
    axis = next((i for i, n in enumerate(scale.shape) if n > 1), None)
    flat = scale.reshape(-1) if axis is not None else scale.reshape(())
    params = QParams(flat, np.zeros(flat.shape, np.int64), QTYPES["int32"], axis)
    peak = _max_abs(term.values)
    partial = peak if accum.abs_sum is None else max(peak, _max_abs(accum.abs_sum))
    return term.values, params, Requant(None, True, "", peak, partial)  # no rounding: exact integers


def weight_scale(step: Step) -> np.ndarray | None:
    if step.op in ("Conv", "Gemm", "MatMul") and len(step.operands) > 1:
        return step.operands[1].params.scale
    return None
