"""The closed-form gradients of docs/gradients.md against autograd through the real schemes.

For ``L = <G, N(W)>`` (``G`` the upstream gradient dL/dN), with ``m = max|W| = |W_a|`` and
``s = sign(W_a)``:

* layer-max, full scale:   dL/dW = G/m - (<G, W>/m^2) s e_a         (orthogonal to W)
* layer-max, detached:     dL/dW = G/m
* channel-max, full:       the layer-max formula on every output row
* weight-norm, full:       dL/dW_c = (G_c - <G_c, N_c> N_c) / ||W_c||  (orthogonal per row)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wnconvert.convert.layout import ChannelLayout
from wnconvert.convert.schemes import ChannelMax, LayerMax, WeightNorm


def _autograd(cls, w: torch.Tensor, g: torch.Tensor, scale_grad: str = "full") -> torch.Tensor:
    conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], bias=False)
    p = cls(w, ChannelLayout.of(conv), gain="none", scale_grad=scale_grad).double()
    x = w.clone().requires_grad_(True)
    (p.normalize(x) * g).sum().backward()
    return x.grad


def _data(seed: int = 0, shape=(6, 4, 3, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64),
            torch.randn(shape, generator=gen, dtype=torch.float64))


def layer_max_grad(w: torch.Tensor, g: torch.Tensor, detach: bool = False) -> torch.Tensor:
    a = int(w.abs().argmax())
    m = w.abs().flatten()[a]
    out = g / m
    if not detach:
        s = torch.sign(w.flatten()[a])
        e = torch.zeros_like(w).flatten()
        e[a] = 1.0
        out = out - (torch.sum(g * w) / m ** 2) * s * e.view_as(w)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_max_full(seed):
    w, g = _data(seed)
    torch.testing.assert_close(_autograd(LayerMax, w, g), layer_max_grad(w, g), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_layer_max_detached(seed):
    w, g = _data(seed)
    torch.testing.assert_close(_autograd(LayerMax, w, g, "detach"), layer_max_grad(w, g, detach=True),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_scale_gradient_is_orthogonal_to_w(seed):
    w, g = _data(seed)
    for cls in (LayerMax, ChannelMax, WeightNorm):
        grad = _autograd(cls, w, g)
        assert abs(float(torch.sum(grad * w))) < 1e-10 * float(grad.norm() * w.norm())
    # The detached scale is not: <G/m, W> = <G, N>, generically nonzero.
    grad = _autograd(LayerMax, w, g, "detach")
    torch.testing.assert_close(torch.sum(grad * w), torch.sum(g * w) / w.abs().max())
    assert abs(float(torch.sum(grad * w))) > 1e-3


def test_argmax_element_gradient():
    w, g = _data(3, shape=(16, 8, 3, 3))
    a = int(w.abs().argmax())
    m, s = w.abs().flatten()[a], torch.sign(w.flatten()[a])
    n_dot_g = torch.sum(g * w / m)
    grad = _autograd(LayerMax, w, g).flatten()
    # dL/dW_a = (G_a - s <G, N>) / m ; every other element gets G_i / m
    torch.testing.assert_close(grad[a], (g.flatten()[a] - s * n_dot_g) / m)
    others = torch.arange(w.numel()) != a
    torch.testing.assert_close(grad[others], g.flatten()[others] / m)
    # The correction sums over all n elements: with N random and G independent it is ~sqrt(n)
    # times rms(N) larger than a typical entry; here it dominates the mean |grad|.
    assert grad[a].abs() > 3 * grad[others].abs().mean()


def test_channel_max_per_row():
    w, g = _data(4)
    expected = torch.stack([layer_max_grad(w[c], g[c]) for c in range(w.shape[0])])
    torch.testing.assert_close(_autograd(ChannelMax, w, g), expected, rtol=1e-12, atol=1e-12)
    detached = torch.stack([g[c] / w[c].abs().max() for c in range(w.shape[0])])
    torch.testing.assert_close(_autograd(ChannelMax, w, g, "detach"), detached, rtol=1e-12, atol=1e-12)


def test_weight_norm_per_row():
    w, g = _data(5)
    rows_w, rows_g = w.flatten(1), g.flatten(1)
    norms = rows_w.norm(dim=1, keepdim=True)
    n = rows_w / norms
    expected = (rows_g - (rows_g * n).sum(dim=1, keepdim=True) * n) / norms
    torch.testing.assert_close(_autograd(WeightNorm, w, g), expected.view_as(w), rtol=1e-12, atol=1e-12)


def test_gradient_scales_inversely_with_w():
    # Scale invariance: N(cW) = N(W), so dL/dW at cW is (1/c) dL/dW at W. Hence SGD's step on the
    # direction W/||W|| shrinks like lr/||W||^2 (the effective learning rate in dynamics.jsonl).
    w, g = _data(6)
    for cls in (LayerMax, ChannelMax, WeightNorm):
        torch.testing.assert_close(_autograd(cls, 5.0 * w, g), _autograd(cls, w, g) / 5.0)
