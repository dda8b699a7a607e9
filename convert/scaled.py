"""Explicit scales in a folded model: the static weight stays in [-1, 1], the scale is its own op.

* Output side (the usual case): ``y = layer(x; stored) * scale + bias``. The layer keeps its type
  and name; a forward hook applies the scale, and the ONNX graph gets ``Conv -> Mul -> Add``.
  A fixed-point target runs the integer conv and then one requantization multiply.
* Weight side (layers whose weight is read directly by the parent's forward, e.g. the projections
  of ``nn.MultiheadAttention`` or torchvision's Swin attention): ``weight = stored * scale``, a
  parametrization that exports as ``Mul(stored, scale)`` feeding the MatMul. Constant folding
  must then be off at export, or the exporter multiplies it back into one tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .layout import ChannelLayout, output_channel_shape

OUT_SCALE = "wn_out_scale"
OUT_BIAS = "wn_out_bias"


def _apply_output_scale(module: nn.Module, args, output: Tensor) -> Tensor:
    scale = getattr(module, OUT_SCALE)
    if scale.dim() > 0:
        scale = scale.reshape(output_channel_shape(module, output))
    out = output * scale
    bias = getattr(module, OUT_BIAS)
    if bias is not None:
        out = out + bias.reshape(output_channel_shape(module, output))
    return out


def add_output_scale(module: nn.Module, scale: Tensor, bias: Tensor | None) -> None:
    """Make ``module`` compute ``module(x) * scale + bias``; its own bias must already be None."""
    module.register_buffer(OUT_SCALE, scale.detach().clone())
    module.register_buffer(OUT_BIAS, None if bias is None else bias.detach().clone())
    module.register_forward_hook(_apply_output_scale)


def output_scale_of(module: nn.Module) -> Tensor | None:
    return getattr(module, OUT_SCALE, None)


class WeightScale(nn.Module):
    """Parametrization ``weight = stored * scale`` (scalar or per output channel)."""

    def __init__(self, scale: Tensor, layout: ChannelLayout) -> None:
        super().__init__()
        self.layout = layout
        self.register_buffer("scale", scale.detach().clone())

    def forward(self, stored: Tensor) -> Tensor:
        if self.scale.dim() == 0:
            return stored * self.scale
        return self.layout.mul(stored, self.scale)


def add_weight_scale(module: nn.Module, tensor_name: str, scale: Tensor, layout: ChannelLayout) -> None:
    parametrize.register_parametrization(module, tensor_name, WeightScale(scale, layout), unsafe=True)


def has_weight_scales(model: nn.Module) -> bool:
    return any(isinstance(m, WeightScale) for m in model.modules())


def stored_tensor(module: nn.Module, tensor_name: str) -> Tensor:
    """The tensor a folded model stores for ``module.<tensor_name>`` (before any weight scale)."""
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return getattr(module, tensor_name)


@torch.no_grad()
def strip_parametrizations(module: nn.Module) -> None:
    """Turn every parametrized tensor of ``module`` into a plain parameter holding its current value.

    Unlike ``parametrize.remove_parametrizations`` this never edits the generated class, which a
    ``deepcopy`` shares with the module it was copied from; it gives this instance its original
    class back instead, leaving any other instance alone.
    """
    if not parametrize.is_parametrized(module):
        return
    values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
    module.__class__ = parametrize.type_before_parametrizations(module)
    del module._modules["parametrizations"]
    for name, value in values.items():
        module.register_parameter(name, nn.Parameter(value, requires_grad=False))
