"""The learned clipping range of the max schemes on the B-bit grid (``--weight-range learned``).

``layer-max`` / ``channel-max`` with ``--weight-bits B`` store ``N = q(W / m)`` with ``m`` the
(channel's) max ``|W|``, so ``±L`` sits on the largest weight and a few outliers spend the levels
every other weight needs. With the learned range the stored weight is

    N = q(clamp(W / c, -1, 1)),   c = alpha · m,   alpha = 2^a,   a in [log2(MIN_CLIP), 0]

and the effective weight ``gain · alpha · N``: the clip ``c`` is a learned fraction ``alpha`` of the
max (one per layer for layer-max, one per output channel for channel-max). ``a = 0`` at apply
time, so ``c = max|W_c|`` and the layer is bit for bit the max scheme's (the pretrained function at
step 0). ``N`` is still on the grid ``k / L`` in [-1, 1] (clamped, then rounded), so the fold, the
certificate, the exact-grid export and ``inspect --require-unit-range`` see what they see for the max
schemes; the scale the fold writes is ``gain · alpha``.

Why a fraction of the max rather than an absolute ``c``: ``W / m`` keeps the raw tensor scale
invariant (docs/gradients.md keeps holding for ``W``, weight decay keeps its meaning) and ``a`` is
dimensionless, about the same size in every layer, so one learning rate fits all of them (the
``scales`` group, models/optim.py).

Gradient (LSQ's, Esser et al. 2020, through the straight-through rounding): with ``v = W/(alpha m)``,
``d(alpha · q(clamp(v))) / d alpha = q(v) - v`` where ``|v| <= 1`` and ``sign(v)`` where clipped,
times ``gain`` and ``alpha · ln 2`` for the log2 parameter; ``W`` gets the straight-through gradient
inside the range and none where it is clipped (tests/test_learned_range.py checks both against the
formula). A collapsing range is held at ``MIN_CLIP`` of the max (the forward clamps ``a``; its
gradient is passed only while ``a`` is in range or the step would bring it back), so the divisor
never reaches 0 and nothing turns NaN; above ``alpha = 1`` the range would only spend levels on
values no weight has, so ``a`` is held at or below 0 the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

MIN_CLIP = 2.0 ** -4          # floor of alpha: the clip never goes below 1/16 of the (channel) max
MIN_LOG2_CLIP = math.log2(MIN_CLIP)


class _HeldClamp(torch.autograd.Function):
    """``clamp(a, lo, hi)`` whose gradient passes inside ``[lo, hi]`` (ends included) and, outside,
    only when a descent step would move ``a`` back towards the range: a parameter that overshoots
    by one step is neither stuck (plain clamp: zero gradient) nor free to wander off."""

    @staticmethod
    def forward(ctx, a: Tensor, lo: float, hi: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a)
        ctx.bounds = (lo, hi)
        return a.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (a,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        keep = ((a >= lo) & (a <= hi)) | ((a > hi) & (grad > 0)) | ((a < lo) & (grad < 0))
        return torch.where(keep, grad, torch.zeros_like(grad)), None, None


class LearnedClip(nn.Module):
    """The learned ratio ``alpha = 2^a`` of one max-scheme parametrization: a scalar (layer-max) or
    one per output channel (channel-max). ``log2_clip`` is what the optimizer's ``scales`` group
    trains."""

    def __init__(self, shape: tuple[int, ...], device: torch.device | None = None) -> None:
        super().__init__()
        self.log2_clip = nn.Parameter(torch.zeros(shape, device=device))

    def ratio(self) -> Tensor:
        """``alpha`` in ``[MIN_CLIP, 1]`` (float32, differentiable)."""
        return torch.exp2(_HeldClamp.apply(self.log2_clip.float(), MIN_LOG2_CLIP, 0.0))

    def extra_repr(self) -> str:
        a = self.ratio().detach()
        return f"alpha in [{float(a.min()):.4g}, {float(a.max()):.4g}]"


class _UnitClamp(torch.autograd.Function):
    """``clamp(v, -1, 1)`` with the gradient passed where ``|v| <= 1``, ends included (LSQ's
    "inside"): torch's clamp passes none at ``|v| == 1``, which would cut the element holding the
    max off its gradient at ``alpha = 1``, unlike the max scheme it starts as."""

    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(v)
        return v.clamp(-1.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (v,) = ctx.saved_tensors
        return torch.where(v.abs() <= 1, grad, torch.zeros_like(grad))


def clipped_unit(weight: Tensor, divisor: Tensor, layout, per_channel: bool) -> Tensor:
    """``clamp(W / divisor, -1, 1)`` per channel (or per tensor): the unrounded stored weight."""
    v = layout.div(weight, divisor) if per_channel else weight / divisor
    return _UnitClamp.apply(v)


def is_learned_clip(module: nn.Module) -> bool:
    return isinstance(module, LearnedClip)
