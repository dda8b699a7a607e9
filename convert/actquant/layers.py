"""A conv/linear layer fused with its BatchNorm and activation, in training and deployed form.

``QLayer`` wraps a reparametrized ``Conv2d``/``Linear`` whose weight is on the scheme's grid
(``N(W) = k / L`` with ``L = 2^(B-1) - 1``, times the gain ``g``), the BatchNorm that is its only
consumer (or none) and a following ReLU/ReLU6 (or none).

* training, BatchNorm live:  ``act(bn(conv(x, g·N(W))))`` with batch statistics;
* training, BatchNorm frozen (``bn.eval()``): the same with the running statistics;
* eval: exactly the deployed integer layer, as :func:`deployed_parts` writes it to ONNX:
  weight ``k_c · s_w,c`` with ``s_w,c = |g_c · f_c| / L`` (``f_c = gamma_c / sqrt(var_c + eps)``,
  its sign moved into ``k``), bias ``round_half_even(b_c / (s_x · s_w,c)) · (s_x · s_w,c)`` with
  ``b = (b_conv - mean) · f + beta``, an int32. ``s_x`` is the scale of the quantizer feeding the
  layer. Conv and bias then run in float32, as onnxruntime's unfused QDQ graph does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..apply import reparam_of
from ..errors import UserInputError
from ..names import WEIGHT_BITS_SCHEMES
from .po2 import MIN_LOG2, po2_exponents, po2_ratio
from .quantizer import ActQuantizer

ACTIVATIONS = (None, "relu", "relu6")
INT32 = (-(2 ** 31), 2 ** 31 - 1)


@dataclass
class DeployedParts:
    """The integers and scales of one deployed layer (numpy, as they go into the ONNX file)."""

    weight_int: np.ndarray     # int64 values within the weight grid, layer's weight shape
    weight_scale: np.ndarray   # float32 [out_channels], positive
    bias_int: np.ndarray       # int64 values within int32, [out_channels]
    bias_scale: np.ndarray     # float32 [out_channels] == float32(s_x * s_w,c)
    weight_bits: int


class QLayer(nn.Module):
    def __init__(self, layer: nn.Module, bn: nn.Module | None, act: str | None, name: str,
                 po2: bool = False) -> None:
        super().__init__()
        p = reparam_of(layer, "weight")
        if p is None or not getattr(p, "weight_bits", None) or p.name not in WEIGHT_BITS_SCHEMES:
            raise UserInputError(
                f"activation quantization needs every conv/linear weight on a fixed grid "
                f"(--weight-bits with {' or '.join(WEIGHT_BITS_SCHEMES)}); layer {name!r} has none")
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise UserInputError(f"layer {name!r}: padding mode {layer.padding_mode!r} has no ONNX QDQ form here")
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r}")
        self.layer, self.bn, self.act, self.name, self.po2 = layer, bn, act, name, po2
        self._input_quant: ActQuantizer | None = None
        self.register_buffer("bn_frozen", torch.zeros((), dtype=torch.bool))

    def set_input_quantizer(self, q: ActQuantizer) -> None:
        object.__setattr__(self, "_input_quant", q)  # a reference, not a submodule (no double state)

    @property
    def weight_bits(self) -> int:
        return reparam_of(self.layer, "weight").weight_bits

    @property
    def is_conv(self) -> bool:
        return isinstance(self.layer, nn.Conv2d)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.po2:
            y = self._po2_train(x)
        elif self.training:
            y = self.layer(x)
            if self.bn is not None and not bool(self.bn_frozen):
                y = self.bn(y)
            elif self.bn is not None:  # frozen: running statistics, nothing updated
                bn = self.bn
                y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            w, b = self.deployed_tensors()
            y = self.layer._conv_forward(x, w, b) if self.is_conv else F.linear(x, w, b)
        if self.act == "relu":
            return F.relu(y)
        if self.act == "relu6":
            return F.relu6(y)
        return y

    def _po2_train(self, x: Tensor) -> Tensor:
        """The training form with power-of-two per-channel factors (module docstring)."""
        p = reparam_of(self.layer, "weight")
        unit = p.normalize(self.layer.parametrizations.weight.original)      # k / L, STE on the grid
        z = self.layer._conv_forward(x, unit, None) if self.is_conv else F.linear(x, unit)
        out = unit.shape[0]
        g = p.scale_tensor()  # the gain (times the clip ratio of a learned range)
        g = g if g is not None else unit.new_ones(())
        g = g.expand(out) if g.dim() == 0 else g
        b = self.layer.bias if self.layer.bias is not None else unit.new_zeros(out)
        shape = (1, -1) + (1,) * (z.dim() - 2)
        levels = 2 ** (p.weight_bits - 1) - 1
        if self.bn is None:
            t = g
            return z * (t * po2_ratio(t, levels)).reshape(shape) + b.reshape(shape)
        mean, var = self._bn_stats(z * g.reshape(shape) + b.reshape(shape))
        f = self.bn.weight / torch.sqrt(var + self.bn.eps)
        r = po2_ratio(g * f, levels)
        return z * (g * f * r).reshape(shape) + ((b - mean) * f * r + self.bn.bias).reshape(shape)

    def _bn_stats(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Batch mean and (biased) variance per channel while BatchNorm is live, updating its
        running statistics like ``nn.BatchNorm``; the running statistics once it is frozen."""
        bn = self.bn
        if bool(self.bn_frozen):
            return bn.running_mean, bn.running_var
        dims = [d for d in range(y.dim()) if d != 1]
        mean, var = y.mean(dims), y.var(dims, unbiased=False)
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            n = y.numel() // y.shape[1]
            bn.running_mean.mul_(1 - m).add_(mean.detach() * m)
            bn.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1, 1)) * m)
        return mean, var

    def _state_key(self) -> tuple:
        """Changes whenever anything the deployed layer depends on changes (in-place updates
        bump a tensor's ``_version``)."""
        tensors = [t for t in (*self.layer.parameters(), *self.layer.buffers(),
                               *(self.bn.parameters() if self.bn is not None else ()),
                               *(self.bn.buffers() if self.bn is not None else ()))]
        s_x = self._input_quant.log2_scale if self._input_quant is not None else None
        return tuple((id(t), t._version) for t in tensors) + (
            (id(s_x), s_x._version, float(s_x)) if s_x is not None else ())

    @torch.no_grad()
    def deployed(self) -> DeployedParts:
        """:func:`deployed_parts` of this layer, cached like :meth:`deployed_tensors` (the export
        and the eval-mode forward read the same parts)."""
        key = self._state_key()
        cached = self.__dict__.get("_parts_cache")
        if cached is None or cached[0] != key:
            cached = (key, deployed_parts(self))
            self.__dict__["_parts_cache"] = cached
        return cached[1]

    @torch.no_grad()
    def deployed_tensors(self) -> tuple[Tensor, Tensor]:
        """Weight and bias of the deployed layer as float32 tensors (``int · scale`` in float32,
        what ``DequantizeLinear`` computes); cached until a parameter or the input scale changes."""
        key = self._state_key()
        cached = self.__dict__.get("_deployed_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        d = self.deployed()
        dev = self.layer.parametrizations.weight.original.device
        shape = (-1,) + (1,) * (d.weight_int.ndim - 1)
        w = torch.from_numpy(d.weight_int.astype(np.float32)) * torch.from_numpy(d.weight_scale).reshape(shape)
        b = torch.from_numpy(d.bias_int.astype(np.float32)) * torch.from_numpy(d.bias_scale)
        out = (w.to(dev), b.to(dev))
        self.__dict__["_deployed_cache"] = (key, out, (d.weight_scale, d.bias_scale))
        return out

    def accumulator_scales(self) -> tuple[np.ndarray, np.ndarray]:
        """``(s_w,c, s_x·s_w,c)`` per output channel (float32) of the deployed layer, cached with it."""
        self.deployed_tensors()
        return self.__dict__["_deployed_cache"][2]


def _weight_grid(q: QLayer) -> tuple[np.ndarray, np.ndarray, int]:
    """``(k, g, bits)``: the trained grid integers and the gain per output channel."""
    p = reparam_of(q.layer, "weight")
    stored, gain = p.unit_parts(q.layer.parametrizations.weight.original)
    L = 2 ** (p.weight_bits - 1) - 1
    k = torch.round(stored.float() * L).clamp_(-L, L)
    g = gain.double().expand(k.shape[0]) if gain.dim() == 0 else gain.double()
    return k.cpu().numpy().astype(np.int64), g.cpu().numpy(), p.weight_bits


def _bn_terms(q: QLayer, out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(b_conv, mean, factor, beta)`` per output channel (float64); no BatchNorm: 0, 1, 0."""
    bias = (q.layer.bias.detach().double().cpu().numpy() if q.layer.bias is not None else np.zeros(out))
    if q.bn is None:
        return bias, np.zeros(out), np.ones(out), np.zeros(out)
    bn = q.bn
    factor = (bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)).cpu().numpy()
    return bias, bn.running_mean.double().cpu().numpy(), factor, bn.bias.detach().double().cpu().numpy()


def deployed_parts(q: QLayer) -> DeployedParts:
    """The deployed integer layer; needs the input quantizer's scale (eval form)."""
    if q._input_quant is None:
        raise RuntimeError(f"layer {q.name} has no input quantizer")
    k, g, bits = _weight_grid(q)
    L = 2 ** (bits - 1) - 1
    b_conv, mean, factor, beta = _bn_terms(q, k.shape[0])
    f = g * factor
    sign = np.where(f < 0, -1, 1).reshape((-1,) + (1,) * (k.ndim - 1))
    k = k * sign
    if q.po2:  # s_w = 2^e; BatchNorm's factor, in the bias too, times r = 2^e · L / |f|
        s_w64 = np.exp2(po2_exponents(f, L).astype(np.float64))
        r = s_w64 / np.maximum(np.abs(f) / L, 2.0 ** MIN_LOG2) if q.bn is not None else 1.0
        s_w = s_w64.astype(np.float32)
    else:
        r, s_w = 1.0, (np.abs(f) / L).astype(np.float32)
    bias = (b_conv - mean) * factor * r + beta
    dead = (s_w == 0) | (f == 0)
    s_w[dead] = np.float32(2.0 ** -(bits - 1) if q.po2 else 1.0 / L)  # any positive step: weights are 0
    k[dead] = 0
    s_x = np.float32(q._input_quant.scale_value())
    b_scale = (s_x * s_w).astype(np.float32)          # float32 product, as onnxruntime forms it
    b_int = np.clip(np.round(bias / b_scale.astype(np.float64)), *INT32).astype(np.int64)
    return DeployedParts(k, s_w, b_int, b_scale, bits)
