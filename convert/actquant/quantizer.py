"""Per-tensor activation fake quantization with a learned (LSQ) or frozen scale.

``q(x) = clamp(round_half_even(x / s), qmin, qmax) * s`` with zero point 0: exactly what ONNX
``QuantizeLinear`` followed by ``DequantizeLinear`` computes in float32 (``x / s`` is a true
division, as onnxruntime's kernel does, not a multiplication by ``1 / s``). The grid is unsigned
``[0, 2^A - 1]`` for tensors known to be non-negative and signed ``[-2^(A-1), 2^(A-1) - 1]``
otherwise.

The scale is stored in the log2 domain (``scale = 2 ** log2_scale``, evaluated in float32 the same
way every time), so that a power-of-two restriction can later round ``log2_scale``. The gradient
is LSQ's: straight through inside the range, zero outside, and on the scale
``(round(x/s) - x/s)`` inside, ``qmin``/``qmax`` outside, times ``1 / sqrt(numel * qmax)``.

Calibration: while ``calibrating`` the quantizer passes its input through unchanged and records,
per batch, the 99.99th percentile of ``|x|`` (of ``x`` for an unsigned tensor); ``finish_calibration``
sets ``scale = mean of those / qmax``. The percentile ignores the few outliers a plain max would
let stretch the grid; the mean over batches smooths the per-batch noise.

With ``po2`` (``--scale-format po2``) the scale is ``2 ** round(log2_scale)``: the rounding has a
straight-through gradient, so a learned scale moves in the log2 domain and a frozen one is the
calibrated scale rounded once (the rounding is idempotent). A ``max_scale`` bound (ReLU6) is then
``2 ** floor(log2(max_scale))``, so that the grid still implies the clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..configs import check_act_settings
from ..errors import UserInputError
from ..names import ROUNDINGS
from .po2 import round_ste

CALIB_PERCENTILE = 99.99
MIN_SCALE = 2.0 ** -30
PERCENTILE_SAMPLE = 1 << 20  # elements per batch the percentile is taken over (a strided subsample)


@dataclass(frozen=True)
class ActQuantConfig:
    """Activation quantization of a model: ``bits`` per activation tensor, ``range`` learned or
    frozen after calibration. ``mixed_precision``: operations without an integer form (hardswish,
    SiLU, sigmoid, GELU, tanh, the squeeze-excite multiply) stay in float between a dequantize and
    a quantize instead of being refused. ``residual_conv``: ``float`` leaves the output of a conv
    read only by a residual add unquantized (OpenVINO fuses the add into the conv and skips that
    requantization; quantize/placement.py), ``quantized`` requantizes it. Freezing BatchNorm is the
    caller's schedule (:func:`freeze_bn`)."""

    bits: int = 8
    range: str = "learned"
    scale_format: str = "float"
    mixed_precision: bool = False
    residual_conv: str = "quantized"
    rounding: str = "onnx"

    def __post_init__(self) -> None:
        check_act_settings(self.bits, self.range, self.scale_format, self.mixed_precision, self.residual_conv)
        if self.rounding not in ROUNDINGS:
            raise UserInputError(f"unknown --rounding {self.rounding!r}; choose one of: {', '.join(ROUNDINGS)}")
        if self.rounding == "tflite" and not self.po2:
            raise UserInputError("--rounding tflite computes TFLite's integer arithmetic exactly on power-of-two "
                                 "scales: it needs --scale-format po2")

    @property
    def po2(self) -> bool:
        return self.scale_format == "po2"

    def to_dict(self) -> dict:
        return {"bits": self.bits, "range": self.range, "scale_format": self.scale_format,
                "mixed_precision": self.mixed_precision, "residual_conv": self.residual_conv,
                "rounding": self.rounding}


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


class _LsqRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, qmin: int, qmax: int, grad_factor: float):  # type: ignore[override]
        v = x.float() / scale
        k = torch.round(v).clamp_(qmin, qmax)
        ctx.save_for_backward(v, k)
        ctx.grad_factor = grad_factor
        ctx.bounds = (qmin, qmax)
        return (k * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, k = ctx.saved_tensors
        qmin, qmax = ctx.bounds
        inside = (v >= qmin) & (v <= qmax)
        g = grad.float()
        grad_x = torch.where(inside, g, torch.zeros_like(g)).to(grad.dtype)
        dq_ds = torch.where(inside, k - v, k)  # outside the range k is qmin or qmax
        grad_s = (g * dq_ds).sum() * ctx.grad_factor
        return grad_x, grad_s.reshape(()), None, None, None


class ActQuantizer(nn.Module):
    """One quantization point: per-tensor scale, zero point 0, ``bits`` unsigned or signed."""

    def __init__(self, bits: int, signed: bool, learned: bool = True, max_scale: float | None = None,
                 po2: bool = False) -> None:
        super().__init__()
        self.bits, self.signed, self.po2 = bits, signed, po2
        self.qmin, self.qmax = int_range(bits, signed)
        self.max_scale = max_scale  # e.g. 6 / qmax after ReLU6: the clip is then implied by the grid
        init = torch.zeros(())
        if learned:
            self.log2_scale = nn.Parameter(init)
        else:
            self.register_buffer("log2_scale", init)
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.calibrating = False
        self._calib: list[float] = []
        self.rounding = "onnx"   # eval-mode requantization: onnx (round half to even) | tflite
        self._tflite_src: tuple | None = None

    def set_tflite_source(self, kind: str, *producers) -> None:
        """What produces this point's integers in TFLite (``layer``: the QLayer; ``add``: the two
        input quantizers; ``pool``: the input quantizer of a global average pool): references,
        not submodules."""
        object.__setattr__(self, "_tflite_src", (kind, *producers))

    def scale(self) -> Tensor:
        """The scale as float32, clamped to ``[MIN_SCALE, max_scale]``; what the export writes."""
        if self.po2:
            e = round_ste(self.log2_scale.float()).clamp(math.log2(MIN_SCALE), None)
            if self.max_scale is not None:
                e = e.clamp(None, math.floor(math.log2(self.max_scale)))
            return torch.exp2(e)
        s = torch.exp2(self.log2_scale.float())
        hi = self.max_scale if self.max_scale is not None else None
        return s.clamp(MIN_SCALE, hi)

    def scale_value(self) -> float:
        return float(self.scale().detach())

    def forward(self, x: Tensor, *inputs: Tensor) -> Tensor:
        """``inputs``: under ``--rounding tflite``, the tensors an add or a pool read (the graph
        passes them), from which eval mode computes TFLite's integers."""
        if self.calibrating:
            self._record(x.detach())
            return x
        if not self.training and self.rounding == "tflite" and self._tflite_src is not None:
            from .tflite_points import tflite_integers
            with torch.no_grad():
                k = tflite_integers(self, x, inputs).clamp_(self.qmin, self.qmax)
            return (k.to(torch.float32) * self.scale()).to(x.dtype)
        grad_factor = 1.0 / math.sqrt(max(x.numel() // max(x.shape[0], 1), 1) * self.qmax)
        return _LsqRound.apply(x, self.scale(), self.qmin, self.qmax, grad_factor)

    @torch.no_grad()
    def integers(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(k, v)``: the integers the point holds for ``x`` and the unrounded ``v = x / s``."""
        v = x.float() / self.scale()
        return torch.round(v).clamp_(self.qmin, self.qmax), v

    # -- calibration -------------------------------------------------------------------------
    def _record(self, x: Tensor) -> None:
        flat = (x if not self.signed else x.abs()).reshape(-1).float()
        step = max(1, flat.numel() // PERCENTILE_SAMPLE)
        flat = flat[::step]
        k = max(1, min(flat.numel(), math.ceil(flat.numel() * CALIB_PERCENTILE / 100)))
        self._calib.append(float(flat.kthvalue(k).values))

    @torch.no_grad()
    def finish_calibration(self) -> None:
        self.calibrating = False
        if not self._calib:
            return
        top = max(sum(self._calib) / len(self._calib), 0.0)
        s = top / self.qmax if top > 0 else 1.0 / self.qmax
        if self.max_scale is not None:
            s = min(s, self.max_scale)
        self.log2_scale.copy_(torch.tensor(math.log2(max(s, MIN_SCALE))))
        self.calibrated.fill_(True)
        self._calib = []

    # -- diagnostics -------------------------------------------------------------------------
    @torch.no_grad()
    def diagnose(self, x: Tensor) -> dict:
        """Scale, fraction of elements clipped, and SQNR (dB) of the quantized activation."""
        k, v = self.integers(x)
        xf = x.float()
        err = k * self.scale() - xf
        clipped = float(((v < self.qmin - 0.5) | (v > self.qmax + 0.5)).float().mean())
        sig, noise = float(xf.square().sum()), float(err.square().sum())
        sqnr = math.inf if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise)
        return {"scale": self.scale_value(), "clipped": clipped, "sqnr_db": sqnr}

    def extra_repr(self) -> str:
        kind = "int" if self.signed else "uint"
        return f"{kind}{self.bits}, scale={self.scale_value():.6g}" + (", po2" if self.po2 else "")
