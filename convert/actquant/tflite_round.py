"""TFLite's int8 requantization arithmetic in torch (``--rounding tflite``).

Written from TFLite's reference kernels' definitions, independently of any numpy model of them, so
that the two can check each other. Every function takes and returns int64 tensors holding int32
values and reproduces TensorFlow Lite Micro's integers exactly (tests/test_tflite_round.py runs
one-op files in TFLite Micro):

* :func:`quantize_multiplier`: a real multiplier as a Q31 integer and a shift (``frexp``, the
  mantissa rounded half away from zero); a power of two ``2^-n`` becomes ``2^30`` and ``1 - n``;
* :func:`srdhm`: ``SaturatingRoundingDoublingHighMul``, ``(a·b + nudge) / 2^31`` truncated toward
  zero with ``nudge = 2^30`` (``1 - 2^30`` for a negative product): ties go up on positive products
  and toward zero on negative ones;
* :func:`rdbpot`: ``RoundingDivideByPOT``, a right shift rounding half away from zero;
* :func:`mbqm`: ``MultiplyByQuantizedMultiplier``, left shift, then :func:`srdhm`, then
  :func:`rdbpot`: two roundings, even for a power-of-two multiplier (``acc = 85`` at ``2^-2``
  gives 22, not 21);
* :func:`add`: TFLite's int8 ADD: each input offset-corrected, shifted left by 20, rescaled by its
  own multiplier, summed, then requantized by the output multiplier;
* :func:`mean`: TFLite's quantized MEAN over a count of elements (the multiplier ``s_in/s_out``
  divided by the count in Q31, ``QuantizedMeanOrSum``);
* :func:`avg_pool_round`: AVERAGE_POOL_2D's division of a window sum, half away from zero.

Activations are handled as the integers of the fake-quant model (zero point 0, unsigned or
signed); TFLite stores an unsigned tensor as int8 with zero point -128, and every kernel here
subtracts the zero point first, so the results are the same integers, shifted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ADD_LEFT_SHIFT = 20     # int8 ADD's input left shift (TFLite's reference kernel)
_Q31 = 1 << 31


def quantize_multiplier(m: float) -> tuple[int, int]:
    """``(q, shift)`` with ``m ≈ q · 2^(shift - 31)``, ``q`` in ``[2^30, 2^31)`` (0 for ``m = 0``)."""
    if m == 0.0:
        return 0, 0
    frac, shift = math.frexp(float(m))     # m = frac · 2^shift, frac in [0.5, 1)
    q = math.floor(abs(frac) * _Q31 + 0.5) * (1 if frac > 0 else -1)   # TfLiteRound: half away
    if q == _Q31:
        q //= 2
        shift += 1
    if shift < -31:   # TFLite flushes such tiny multipliers to zero
        return 0, 0
    return int(q), int(shift)


def f32(v: float) -> float:
    """``v`` as the float32 a .tflite file stores (TFLite promotes that float32 to double)."""
    return float(torch.tensor(float(v), dtype=torch.float32))


def _tensor(v, like: Tensor) -> Tensor:
    return torch.as_tensor(v, dtype=torch.int64, device=like.device)


def srdhm(a: Tensor, b) -> Tensor:
    """SaturatingRoundingDoublingHighMul of int32 values ``a`` and ``b`` (``b`` broadcast)."""
    a = a.to(torch.int64)
    b = _tensor(b, a)
    ab = a * b
    nudge = torch.where(ab >= 0, _tensor(1 << 30, a), _tensor(1 - (1 << 30), a))
    out = torch.div(ab + nudge, _Q31, rounding_mode="trunc")
    lim = _tensor(-(1 << 31), a)
    return torch.where((a == lim) & (b == lim), _tensor((1 << 31) - 1, a), out)


def rdbpot(x: Tensor, exponent) -> Tensor:
    """RoundingDivideByPOT: ``x / 2^exponent`` rounded half away from zero (``exponent >= 0``)."""
    x = x.to(torch.int64)
    e = _tensor(exponent, x)
    mask = (torch.ones_like(e) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> e) + (remainder > threshold).to(torch.int64)


def mbqm(x: Tensor, q, shift) -> Tensor:
    """MultiplyByQuantizedMultiplier (the int32 form TFLite's int8 kernels use): ``q``, ``shift``
    scalars or tensors broadcast against ``x``."""
    x = x.to(torch.int64)
    sh = _tensor(shift, x)
    left = sh.clamp(min=0)
    right = (-sh).clamp(min=0)
    return rdbpot(srdhm(x * (torch.ones_like(left) << left), q), right)


def multipliers(real: Tensor | list[float]) -> tuple[Tensor, Tensor]:
    """Per element of ``real`` (float64 multipliers): the ``(q, shift)`` int64 tensors."""
    vals = [quantize_multiplier(float(m)) for m in torch.as_tensor(real, dtype=torch.float64).reshape(-1)]
    q = torch.tensor([v[0] for v in vals], dtype=torch.int64)
    s = torch.tensor([v[1] for v in vals], dtype=torch.int64)
    shape = torch.as_tensor(real).shape
    return q.reshape(shape), s.reshape(shape)


def requantize(acc: Tensor, real: Tensor | list[float] | float, channel_dim: int = 1) -> Tensor:
    """A conv/linear accumulator ``acc`` requantized by per-channel (or scalar) ``real``
    multipliers ``s_in · s_w,c / s_out``, as TFLite computes them (in double from float32 scales)."""
    real_t = torch.as_tensor(real, dtype=torch.float64)
    q, s = multipliers(real_t.reshape(-1))
    if real_t.dim() > 0 and real_t.numel() > 1:
        shape = [1] * acc.dim()
        shape[channel_dim] = -1
        q, s = q.reshape(shape), s.reshape(shape)
    else:
        q, s = q.reshape(()), s.reshape(())
    return mbqm(acc, q.to(acc.device), s.to(acc.device))


def add(k1: Tensor, s1: float, k2: Tensor, s2: float, s_out: float) -> Tensor:
    """TFLite's int8 ADD of the integers ``k1`` (scale ``s1``) and ``k2`` (``s2``) into the output
    scale ``s_out``, before the output zero point and clamp."""
    s1, s2, s_out = f32(s1), f32(s2), f32(s_out)
    twice_max = 2.0 * max(s1, s2)
    q1, sh1 = quantize_multiplier(s1 / twice_max)
    q2, sh2 = quantize_multiplier(s2 / twice_max)
    qo, sho = quantize_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * s_out))
    a = mbqm(k1.to(torch.int64) * (1 << ADD_LEFT_SHIFT), q1, sh1)
    b = mbqm(k2.to(torch.int64) * (1 << ADD_LEFT_SHIFT), q2, sh2)
    return mbqm(a + b, qo, sho)


def mean(total: Tensor, count: int, s_in: float, s_out: float) -> Tensor:
    """TFLite's int8 MEAN of ``count`` elements whose (zero-point corrected) sum is ``total``:
    the multiplier ``s_in / s_out`` in Q31, times ``2^⌊log2 count⌋ / count`` in integers."""
    q, shift = quantize_multiplier(f32(s_in) / f32(s_out))
    n = min(count.bit_length() - 1, 32, 31 + shift)
    q = ((q << n) // count) if n >= 0 else q   # int64 division of positive values: floor
    return mbqm(total, q, shift - n)


def avg_pool_round(total: Tensor, count: int) -> Tensor:
    """AVERAGE_POOL_2D's ``total / count`` rounded half away from zero (on the stored int8 values:
    their zero point is part of ``total``)."""
    t = total.to(torch.int64)
    half = count // 2
    return torch.where(t > 0, torch.div(t + half, count, rounding_mode="trunc"),
                       torch.div(t - half, count, rounding_mode="trunc"))
