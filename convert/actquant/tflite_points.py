"""``--rounding tflite``: the eval-mode fake-quant model requantizes as TensorFlow Lite Micro does.

With ``--scale-format po2`` every float32 value the eval model computes before a requantization is
an exact integer multiple of the accumulator's unit (below 2^24, the bit-exact contract's bound), so
the accumulator integers can be read back from it and requantized with TFLite's arithmetic
(:mod:`.tflite_round`) instead of ``round_half_even(x / s)``. Per kind of point:

* ``layer`` (conv/linear, BatchNorm folded, ReLU/ReLU6 fused): ``acc = y / (s_x·s_w,c)`` per
  output channel, then ``MultiplyByQuantizedMultiplier`` by ``s_x·s_w,c / s_y``: TFLite's double
  rounding. A fused ReLU is the clamp at the point's lower bound 0, as TFLite's activation clamp;
* ``add`` (a residual add, a fused ReLU): TFLite's ADD on the two inputs' integers (each shifted
  left by 20 and rescaled by its own multiplier, then the sum requantized), in int64;
* ``pool`` (a global average pool): TFLite's MEAN over H·W (the sum of the input's integers, the
  multiplier ``s_in/s_out`` divided by the count in Q31).

The network input is rounded as before (the .tflite file takes int8 input). Training is unchanged:
the straight-through fake quant of :class:`~.quantizer.ActQuantizer` is its differentiable
approximation; only eval mode (validation, export, verify) computes TFLite's integers.
ONNX files of such a run are checked with the model switched back to ONNX's rounding
(:func:`rounding_mode`): the integers and scales are the same, onnxruntime rounds half to even.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import tflite_round as tr
from .layers import QLayer


def tflite_integers(q, x: Tensor, inputs: tuple[Tensor, ...]) -> Tensor:
    """The int64 integers TFLite computes at point ``q`` (before its clamp to the point's range)."""
    kind, *src = q._tflite_src
    s_y = q.scale_value()
    if kind == "layer":
        layer: QLayer = src[0]
        w_scale, b_scale = layer.accumulator_scales()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        unit = torch.from_numpy(b_scale).to(x.device, torch.float64).reshape(shape)
        acc = torch.round(x.double() / unit).to(torch.int64)
        s_x = tr.f32(layer._input_quant.scale_value())
        real = s_x * torch.from_numpy(w_scale).double() / tr.f32(s_y)
        return tr.requantize(acc, real.to(x.device), channel_dim=1)
    if kind == "add":
        qa, qb = src
        a, b = inputs
        ka = torch.round(a.double() / qa.scale_value()).to(torch.int64)
        kb = torch.round(b.double() / qb.scale_value()).to(torch.int64)
        return tr.add(ka, qa.scale_value(), kb, qb.scale_value(), s_y)
    if kind == "pool":
        (qin,) = src
        (inp,) = inputs
        total = torch.round(inp.double() / qin.scale_value()).to(torch.int64).sum(dim=(2, 3), keepdim=True)
        k = tr.mean(total, inp.shape[2] * inp.shape[3], qin.scale_value(), s_y)
        return k.reshape(x.shape)
    raise RuntimeError(f"no TFLite arithmetic for a {kind} point")


def _quantizers(model: nn.Module):
    from .quantizer import ActQuantizer
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def set_rounding(model: nn.Module, mode: str) -> None:
    for q in _quantizers(model):
        q.rounding = mode


@contextmanager
def rounding_mode(model: nn.Module, mode: str):
    """Every quantizer of ``model`` requantizes with ``mode`` (onnx | tflite) inside the block."""
    qs = _quantizers(model)
    saved = [q.rounding for q in qs]
    for q in qs:
        q.rounding = mode
    try:
        yield model
    finally:
        for q, r in zip(qs, saved):
            q.rounding = r


def onnx_rounding(fn):
    """Decorator: ``fn(qat_model, ...)`` runs with the model in ONNX's rounding (the checks of ONNX
    files: a ``--rounding tflite`` run's file holds the same integers and scales, and onnxruntime
    rounds half to even)."""
    @functools.wraps(fn)
    def wrapper(qat_model, *args, **kwargs):
        with rounding_mode(qat_model, "onnx"):
            return fn(qat_model, *args, **kwargs)
    return wrapper
