"""Fake quantization of a normalized weight to the symmetric B-bit grid on [-1, 1].

For ``B`` bits the grid has ``L = 2**(B-1) - 1`` positive levels: ``q(n) = round(n * L) / L``.
The range is fixed by the scheme (``N(W)`` of layer-max / channel-max lies in [-1, 1] and reaches
±1), so nothing is learned or calibrated: the B-bit integers an export writes are
``round(N(W) * L)`` with scale exactly ``1 / L``, the very values the network trained with.

The backward pass is the straight-through estimator: the gradient of ``q`` is taken as the
identity, so training sees the quantized forward and the un-quantized gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_BITS, MAX_BITS = 2, 8


def levels(bits: int) -> int:
    """Positive levels of the symmetric ``bits``-bit grid: ``2**(bits-1) - 1``."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"weight bits must be an integer in {MIN_BITS}..{MAX_BITS}, not {bits!r}")
    return 2 ** (bits - 1) - 1


def grid_scale(bits: int) -> float:
    """The exact step of the grid, ``1 / L``: the scale of a weight quantizer for it."""
    return 1.0 / levels(bits)


class _RoundToGrid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n: Tensor, num_levels: int) -> Tensor:  # type: ignore[override]
        # Rounding happens in float32 whatever the dtype of n: a float64 re-evaluation of a
        # float32 model (the parity reference) must pick the same level for values near a tie.
        # Clamp guards against rounding of the divide putting |n| a hair above 1.
        n32 = n.float() if n.dtype in (torch.float64, torch.float32) else n
        k = torch.round(n32 * num_levels).clamp_(-num_levels, num_levels)
        return (k / num_levels).to(n.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None


def fake_quant(n: Tensor, bits: int) -> Tensor:
    """``round(n * L) / L`` (exactly, no ``n + (q - n).detach()`` rounding error) with an identity
    gradient."""
    return _RoundToGrid.apply(n, levels(bits))


def on_grid(x: Tensor, bits: int, tol: float = 1e-6) -> bool:
    """Whether every element of ``x`` is ``k / L`` for an integer ``|k| <= L``, to ``tol · L``
    (a float32 ``k / L`` times ``L`` is off by up to a few ulps of ``L``)."""
    L = levels(bits)
    k = x.double() * L
    return bool((k - k.round()).abs().max() <= tol * L) and bool(k.abs().max() <= L * (1 + tol))
