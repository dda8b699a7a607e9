"""Where the output channels of a weight tensor live.

Per-channel schemes and scales work on "rows": one row per output channel of the layer. For Conv
and Linear weights (``[out, in/groups, *k]``) a row is ``weight[c]``. A transposed conv stores its
weight as ``[in, out/groups, *k]``, so output channel ``g * out_per_group + j`` is made of
``weight[g*in_per_group:(g+1)*in_per_group, j]``; ``ChannelLayout`` hides that difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ChannelLayout:
    transposed: bool = False
    groups: int = 1

    @staticmethod
    def of(module: nn.Module) -> "ChannelLayout":
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return ChannelLayout(transposed=True, groups=module.groups)
        return ChannelLayout()

    def num_channels(self, weight: Tensor) -> int:
        if not self.transposed:
            return weight.shape[0]
        return weight.shape[1] * self.groups

    def rows(self, weight: Tensor) -> Tensor:
        """``weight`` as a ``[out_channels, fan]`` matrix (a view where possible)."""
        if not self.transposed:
            return weight.reshape(weight.shape[0], -1)
        g = self.groups
        w = weight.reshape(g, weight.shape[0] // g, weight.shape[1], -1)  # [g, in/g, out/g, k]
        return w.transpose(1, 2).reshape(g * weight.shape[1], -1)

    def broadcast(self, per_channel: Tensor, weight: Tensor) -> Tensor:
        """Reshape a ``[out_channels]`` vector so it multiplies ``weight`` channel by channel.

        For a grouped transposed conv no plain broadcast exists, so use :meth:`mul` there.
        """
        if not self.transposed:
            return per_channel.reshape(-1, *([1] * (weight.dim() - 1)))
        if self.groups != 1:
            raise ValueError("grouped transposed conv: use ChannelLayout.mul")
        return per_channel.reshape(1, -1, *([1] * (weight.dim() - 2)))

    def mul(self, weight: Tensor, per_channel: Tensor) -> Tensor:
        """``weight`` with each output channel multiplied by ``per_channel[c]``."""
        if not (self.transposed and self.groups != 1):
            return weight * self.broadcast(per_channel, weight)
        g = self.groups
        w = weight.reshape(g, weight.shape[0] // g, weight.shape[1], -1)
        v = per_channel.reshape(g, 1, weight.shape[1], 1)
        return (w * v).reshape(weight.shape)

    def div(self, weight: Tensor, per_channel: Tensor) -> Tensor:
        """``weight`` with each output channel divided by ``per_channel[c]``.

        A true division, not a multiplication by the reciprocal: ``x / m`` with ``|x| <= m``
        is at most one in floating point, ``x * (1 / m)`` can round to just above it.
        """
        if not (self.transposed and self.groups != 1):
            return weight / self.broadcast(per_channel, weight)
        g = self.groups
        w = weight.reshape(g, weight.shape[0] // g, weight.shape[1], -1)
        v = per_channel.reshape(g, 1, weight.shape[1], 1)
        return (w / v).reshape(weight.shape)

    def amax(self, weight: Tensor) -> Tensor:
        """Per-output-channel max |w|."""
        return self.rows(weight).abs().amax(dim=1)


def output_channel_shape(module: nn.Module, output: Tensor) -> tuple[int, ...]:
    """Shape that makes a ``[channels]`` vector broadcast over ``module``'s output channels."""
    if isinstance(module, nn.Linear):
        return (output.shape[-1],)
    return (-1,) + (1,) * (output.dim() - 2)


def safe_divisor(t: Tensor) -> Tensor:
    """``t`` with zeros replaced by one, so that an all-zero channel divides to zero, not NaN."""
    return torch.where(t == 0, torch.ones_like(t), t)
