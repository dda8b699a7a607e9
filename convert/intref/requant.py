"""Integer requantization: power-of-two checks, shifts and divisions that round half to even.

Every function here works on integers (numpy int64) except three, named as such:
:func:`quantize_float` (the network input is a float tensor: it is quantized once, exactly as ONNX
``QuantizeLinear`` does), :func:`quantize_constant` (a float clip bound folded into integer bounds
once, at graph-reading time) and :func:`float32_requant` (the visible fallback when a multiplier is
not a power of two).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserInputError

_F32_EXP_BIAS = 127
_F32_MANTISSA_BITS = 23


def is_power_of_two(value: float) -> int | None:
    """``e`` when ``float32(value) == 2**e`` exactly (positive, zero mantissa), else ``None``.

    The check reads the float32 bits: a normal float32 is a power of two iff its 23 mantissa bits
    are all zero; a subnormal iff exactly one mantissa bit is set. ``value`` that is not exactly a
    float32 (a float64 one ulp away from a power of two) is first rounded to float32, as ONNX
    stores scales in float32; pass ``np.float32`` values to avoid that rounding.
    """
    f = np.float32(value)
    if not np.isfinite(f) or f <= 0:
        return None
    bits = int(np.array(f, dtype=np.float32).view(np.uint32))
    exponent = (bits >> _F32_MANTISSA_BITS) & 0xFF
    mantissa = bits & ((1 << _F32_MANTISSA_BITS) - 1)
    if exponent == 0:  # subnormal: 2**(1 - bias - 23 + position of the single bit)
        if mantissa & (mantissa - 1):
            return None
        return mantissa.bit_length() - 1 + 1 - _F32_EXP_BIAS - _F32_MANTISSA_BITS
    return exponent - _F32_EXP_BIAS if mantissa == 0 else None


@dataclass(frozen=True)
class QType:
    """An ONNX integer element type: its name, numpy storage dtype and saturation bounds."""

    name: str
    storage: type
    qmin: int
    qmax: int


QTYPES = {
    "int8": QType("int8", np.int8, -128, 127),
    "uint8": QType("uint8", np.uint8, 0, 255),
    "int4": QType("int4", np.int8, -8, 7),
    "uint4": QType("uint4", np.uint8, 0, 15),
    "int16": QType("int16", np.int16, -32768, 32767),
    "uint16": QType("uint16", np.uint16, 0, 65535),
    "int32": QType("int32", np.int32, -(2**31), 2**31 - 1),
}


def saturate(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.minimum(np.maximum(values, np.int64(lo)), np.int64(hi))


def round_shift(acc: np.ndarray, shift: np.ndarray | int) -> np.ndarray:
    """``round_half_even(acc / 2**shift)`` in integers; a negative ``shift`` is a left shift.

    ``shift`` is a scalar or an array broadcastable to ``acc`` (one shift per channel). Right shifts
    are arithmetic (floor) shifts; the discarded low bits decide the rounding: above one half round
    up, exactly one half round to the even neighbour.
    """
    acc = np.asarray(acc, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if shift.ndim > acc.ndim:
        shift = np.broadcast_to(shift, acc.shape)
    # right, left and half stay the shift's shape (a scalar or one per channel): the operations
    # with acc broadcast them, so no full-size copy of them is made
    right = np.maximum(shift, 0)
    left = np.maximum(-shift, 0)
    floor = acc >> right
    low = acc - (floor << right)
    half = np.where(right > 0, np.int64(1) << np.maximum(right - 1, 0), np.int64(1) << 62)
    up = (low > half) | ((low == half) & ((floor & 1) == 1))
    return (floor + up.astype(np.int64)) << left


def round_div(num: np.ndarray, den: np.ndarray | int) -> np.ndarray:
    """``round_half_even(num / den)`` for integers, ``den > 0``: exact rational arithmetic."""
    num = np.asarray(num, dtype=np.int64)
    den = np.broadcast_to(np.asarray(den, dtype=np.int64), num.shape)
    floor = num // den
    twice_rest = 2 * (num - floor * den)
    up = (twice_rest > den) | ((twice_rest == den) & ((floor & 1) == 1))
    return floor + up.astype(np.int64)


def quantize_float(x: np.ndarray, scale: float, zero_point: int, qtype: QType) -> np.ndarray:
    """ONNX ``QuantizeLinear`` of a float tensor: ``saturate(round_half_even(x / scale) + zp)``.

    Computed in float32 like onnxruntime (a float32 division, then ``rint``): the single float
    step of the reference, at the network input.
    """
    x32 = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x32)):
        raise UserInputError("the input holds NaN or infinite values: it cannot be quantized")
    q = np.rint(x32 / np.float32(scale)).astype(np.float64)
    q = np.clip(q + zero_point, qtype.qmin, qtype.qmax)
    return q.astype(np.int64)


def quantize_constant(value: float, scale: float, zero_point: int, qtype: QType) -> int:
    """One float constant (a Clip bound) quantized like ``QuantizeLinear`` would."""
    return int(quantize_float(np.asarray([value]), scale, zero_point, qtype)[0])


def float32_requant(terms: list[np.ndarray], multipliers: list[np.ndarray],
                    divisor: np.ndarray | None = None) -> np.ndarray:
    """Fallback for multipliers that are not powers of two: ``rint(sum float32(t) * float32(m))``.

    This is what onnxruntime's fused integer kernels do (QLinearConv: the int32 accumulator to
    float32, times ``float32(float32(s_x * s_w) / s_y)``, rounded half to even); an average is then
    divided by its float32 element count. Not integer-only, and for ops other than Conv/Gemm/MatMul
    only an approximation of a given runtime (one step off where a float rounding meets a tie).
    """
    total = np.zeros(np.broadcast_shapes(*[np.shape(t) for t in terms]), dtype=np.float32)
    for t, m in zip(terms, multipliers):
        total = total + np.asarray(t).astype(np.float32) * np.asarray(m, dtype=np.float32)
    if divisor is not None:
        total = total / np.asarray(divisor).astype(np.float32)
    return np.rint(total).astype(np.int64)
