"""TensorFlow Lite's int8 arithmetic in numpy integers, as its reference kernels (and TFLite Micro's)
compute it.

A real multiplier ``m`` (say ``s_x * s_w / s_y``, computed in double from float32 scales) becomes a
Q31 integer and a power-of-two exponent (:func:`quantize_multiplier`); an int32 value is then
multiplied by it in two roundings: :func:`srdhm` (the high 32 bits of the doubled 64-bit product,
rounded half away from zero) and :func:`rounding_divide_by_pot` (an arithmetic right shift rounded
half away from zero). Even a power-of-two ``m`` rounds twice (0.25 is ``2^30`` with exponent -1:
85 -> 43 -> 22, where one rounding gives 21).

Everything here is int64 numpy holding int32 values, except :func:`quantize_multiplier` (the one
float step, done once per tensor or channel when the model is prepared, as TFLite does) and
:func:`quantize_float` (the QUANTIZE op of a float input). No function here knows about files.
"""

from __future__ import annotations

import math

import numpy as np

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
ADD_LEFT_SHIFT = 20  # TFLite's ADD: int8 inputs are shifted left by 20 bits before rescaling


def tflite_round(value: float) -> int:
    """``std::round``: half away from zero (TfLiteRound)."""
    return math.floor(abs(value) + 0.5) * (1 if value >= 0 else -1)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``QuantizeMultiplier``: ``real ≈ q * 2^(shift - 31)`` with ``q`` a Q31 integer in
    ``[2^30, 2^31)`` (rounded half away from zero from ``frexp``'s mantissa) and ``shift`` its
    exponent. 0 gives ``(0, 0)``; exponents below -31 flush to ``(0, 0)`` as TFLite does."""
    real = float(real)
    if real == 0.0:
        return 0, 0
    if not math.isfinite(real) or real < 0:
        raise ValueError(f"multiplier {real} is not a finite non-negative number")
    mantissa, shift = math.frexp(real)
    q = tflite_round(mantissa * (1 << 31))
    if q == 1 << 31:
        q //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        raise ValueError(f"multiplier {real} is too large for TFLite's int32 arithmetic")
    return q, shift


def quantize_multipliers(reals) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_multiplier` of each element: ``(q, shift)`` int64 arrays of the same shape."""
    flat = np.asarray(reals, dtype=np.float64).reshape(-1)
    pairs = [quantize_multiplier(float(r)) for r in flat]
    shape = np.shape(reals)
    q = np.array([p[0] for p in pairs], dtype=np.int64).reshape(shape)
    s = np.array([p[1] for p in pairs], dtype=np.int64).reshape(shape)
    return q, s


def wrap_int32(x: np.ndarray) -> np.ndarray:
    """Two's-complement wrap of int64 values to int32 (what C's int32 arithmetic does)."""
    x = np.asarray(x, dtype=np.int64)
    return ((x + 2 ** 31) & 0xFFFFFFFF) - 2 ** 31


def srdhm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``SaturatingRoundingDoublingHighMul(a, b)`` for int32 ``a``, ``b``: ``(a*b + nudge) / 2^31``
    truncated toward zero, nudge ``2^30`` (``1 - 2^30`` for a negative product); the one overflow
    (both ``INT32_MIN``) saturates to ``INT32_MAX``."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    a, b = np.broadcast_arrays(a, b)
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    # |a*b| <= 2^62: fits int64; the nudged sum too
    ab = a * b
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    total = ab + nudge
    high = np.where(total >= 0, total >> 31, -((-total) >> 31))  # C division: toward zero
    return np.where(overflow, np.int64(INT32_MAX), high)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """``RoundingDivideByPOT(x, e)``: ``x / 2^e`` rounded half away from zero (``e`` in 0..31)."""
    x = np.asarray(x, dtype=np.int64)
    e = np.broadcast_to(np.asarray(exponent, dtype=np.int64), x.shape)
    if np.any((e < 0) | (e > 31)):
        raise ValueError("RoundingDivideByPOT needs an exponent in 0..31")
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).astype(np.int64)
    return (x >> e) + (remainder > threshold).astype(np.int64)


def multiply_by_quantized_multiplier(x: np.ndarray, q: np.ndarray | int, shift: np.ndarray | int) -> np.ndarray:
    """``MultiplyByQuantizedMultiplier(x, q, shift)``: a positive ``shift`` is a left shift of ``x``
    (in int32, wrapping as the C code's multiplication would), then :func:`srdhm` by ``q``, then
    :func:`rounding_divide_by_pot` by the negative part of ``shift``."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    shifted = wrap_int32(x << left)
    return rounding_divide_by_pot(srdhm(shifted, q), np.broadcast_to(right, np.broadcast_shapes(x.shape,
                                                                                               right.shape)))


def multiply_single_rounding(x: np.ndarray, q: np.ndarray | int, shift: np.ndarray | int) -> np.ndarray:
    """``MultiplyByQuantizedMultiplier`` as TFLite builds it with ``TFLITE_SINGLE_ROUNDING``: one
    64-bit product ``x * q`` shifted right by ``31 - shift`` after adding half (ties upward), instead
    of :func:`srdhm` then :func:`rounding_divide_by_pot`. LiteRT 2.3's reference FULLY_CONNECTED
    with per-channel weights computes this (measured: 0 of 400 000 outputs differ; 37 differ from
    the double rounding TensorFlow Lite Micro uses)."""
    total = 31 - np.asarray(shift, dtype=np.int64)
    half = np.left_shift(np.int64(1), total - 1)
    return (np.asarray(x, dtype=np.int64) * np.asarray(q, dtype=np.int64) + half) >> total


def requantize(acc: np.ndarray, q, shift, out_zero_point: int, lo: int, hi: int,
               single_rounding: bool = False) -> np.ndarray:
    """An int32 accumulator to the output integers: multiply (TFLite's double rounding, or
    :func:`multiply_single_rounding`), add the zero point, clamp."""
    multiply = multiply_single_rounding if single_rounding else multiply_by_quantized_multiplier
    y = multiply(acc, q, shift) + int(out_zero_point)
    return np.clip(y, lo, hi)


def conv_multipliers(s_in: float, s_w, s_out: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel multipliers of CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED (TFLite Micro
    computes ``double(s_in) * double(s_w[c]) / double(s_out)``)."""
    s_w = np.asarray(s_w, dtype=np.float32).astype(np.float64)
    real = np.float64(np.float32(s_in)) * s_w / np.float64(np.float32(s_out))
    return quantize_multipliers(real)


def activation_range(kind: str, scale: float, zero_point: int, qmin: int = -128, qmax: int = 127) -> tuple[int, int]:
    """``CalculateActivationRangeQuantized``: the clamp of a fused NONE / RELU / RELU6 / RELU_N1_TO_1,
    each bound ``zp + round_half_away(float32(f / scale))``."""
    def q(f):
        return int(zero_point) + tflite_round(float(np.float32(f) / np.float32(scale)))
    if kind == "NONE":
        return qmin, qmax
    if kind == "RELU":
        return max(qmin, q(0.0)), qmax
    if kind == "RELU6":
        return max(qmin, q(0.0)), min(qmax, q(6.0))
    if kind == "RELU_N1_TO_1":
        return max(qmin, q(-1.0)), min(qmax, q(1.0))
    raise ValueError(f"unknown fused activation {kind}")


class AddParams:
    """TFLite's int8 ADD: each input ``x_i - z_i`` is shifted left by 20 bits and rescaled by
    ``s_i / (2 max(s_1, s_2))``; their sum is rescaled by ``2 max(s_1, s_2) / (2^20 s_out)``; each
    rescaling is ``MultiplyByQuantizedMultiplier`` with a multiplier below one (three roundings in
    all)."""

    def __init__(self, s1: float, s2: float, s_out: float):
        s1, s2, s_out = (float(np.float32(s)) for s in (s1, s2, s_out))
        twice_max = 2.0 * max(s1, s2)
        self.q1, self.shift1 = quantize_multiplier(s1 / twice_max)
        self.q2, self.shift2 = quantize_multiplier(s2 / twice_max)
        self.q_out, self.shift_out = quantize_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * s_out))

    def __call__(self, x1, z1: int, x2, z2: int, z_out: int, lo: int, hi: int) -> np.ndarray:
        a = multiply_by_quantized_multiplier((np.asarray(x1, np.int64) - z1) << ADD_LEFT_SHIFT, self.q1, self.shift1)
        b = multiply_by_quantized_multiplier((np.asarray(x2, np.int64) - z2) << ADD_LEFT_SHIFT, self.q2, self.shift2)
        total = multiply_by_quantized_multiplier(a + b, self.q_out, self.shift_out)
        return np.clip(total + int(z_out), lo, hi)


def rounded_average(sums: np.ndarray, counts: np.ndarray | int) -> np.ndarray:
    """AVERAGE_POOL_2D's int8 average: ``(sum ± count/2) / count`` with C's truncating division
    (half away from zero)."""
    sums = np.asarray(sums, dtype=np.int64)
    counts = np.broadcast_to(np.asarray(counts, dtype=np.int64), sums.shape)
    half = counts // 2
    num = np.where(sums > 0, sums + half, sums - half)
    return np.where(num >= 0, num // counts, -((-num) // counts))


def mean_multiplier(s_in: float, s_out: float, count: int) -> tuple[int, int]:
    """MEAN's multiplier: ``QuantizeMultiplier(s_in / s_out)``, then the division by ``count``
    folded into it in integers as TFLite does: ``k = min(floor(log2 count), 32, 31 + shift)``,
    ``q' = (q << k) // count`` (truncated), ``shift' = shift - k``."""
    q, shift = quantize_multiplier(float(np.float64(np.float32(s_in)) / np.float64(np.float32(s_out))))
    k = min(int(count).bit_length() - 1, 32, 31 + shift)
    return (q << k) // int(count), shift - k


def mean_requantize(sums: np.ndarray, count: int, s_in: float, s_out: float, z_out: int,
                    lo: int = -128, hi: int = 127) -> np.ndarray:
    """MEAN over the spatial axes of int8: the sum of ``x - z_in`` times :func:`mean_multiplier`
    (:func:`multiply_by_quantized_multiplier`: two roundings, no separate division), plus the
    output zero point."""
    q, shift = mean_multiplier(s_in, s_out, count)
    return np.clip(multiply_by_quantized_multiplier(sums, q, shift) + int(z_out), lo, hi)


def requantize_int8(x: np.ndarray, z_in: int, s_in: float, s_out: float, z_out: int) -> np.ndarray:
    """QUANTIZE int8 -> int8 (``Requantize``): ``MultiplyByQuantizedMultiplier(x - z_in, s_in/s_out) + z_out``."""
    q, shift = quantize_multiplier(float(np.float64(np.float32(s_in)) / np.float64(np.float32(s_out))))
    y = multiply_by_quantized_multiplier(np.asarray(x, np.int64) - z_in, q, shift) + int(z_out)
    return np.clip(y, -128, 127)


def quantize_float(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """QUANTIZE float32 -> int8 (``AffineQuantize``): ``round_half_away(float32(x / scale)) + zp``."""
    q = np.asarray(x, dtype=np.float32) / np.float32(scale)
    r = np.where(q >= 0, np.floor(q.astype(np.float64) + 0.5), -np.floor(-q.astype(np.float64) + 0.5))
    return np.clip(r + int(zero_point), -128, 127).astype(np.int64)


def dequantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """DEQUANTIZE int8 -> float32: ``float32(x - zp) * scale``."""
    return (np.asarray(x, np.int64) - int(zero_point)).astype(np.float32) * np.float32(scale)
