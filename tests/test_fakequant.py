"""The B-bit weight grid with a straight-through estimator, and --weight-bits runs."""

import pytest
import torch
from torch import nn

from wnconvert.convert.apply import apply_scheme, reparametrized
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.fakequant import fake_quant, grid_scale, levels, on_grid
from wnconvert.convert.fold import fold_model
from wnconvert.convert.scaled import stored_tensor
from wnconvert.convert.schemes import SchemeConfig


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_forward_on_grid(bits):
    L = 2 ** (bits - 1) - 1
    assert levels(bits) == L and grid_scale(bits) == 1.0 / L
    n = torch.linspace(-1, 1, 1001)
    q = fake_quant(n, bits)
    assert torch.equal(q, torch.round(n * L) / L)
    assert on_grid(q, bits)
    assert q.abs().max() == 1.0
    assert len(torch.unique(q)) == 2 * L + 1


def test_straight_through_gradient():
    n = torch.linspace(-1, 1, 37, requires_grad=True)
    w = torch.randn(37)
    (fake_quant(n, 4) * w).sum().backward()
    g_q = n.grad.clone()
    n.grad = None
    (n * w).sum().backward()
    assert torch.equal(g_q, n.grad)


@pytest.mark.parametrize("bad", [1, 9, 0, 2.5, True])
def test_levels_rejects(bad):
    with pytest.raises(ValueError):
        levels(bad)


def test_scheme_config_validation():
    assert SchemeConfig("layer-max", weight_bits=4).weight_bits == 4
    assert SchemeConfig("channel-max", weight_bits=8).weight_bits == 8
    for scheme in ("weight-std", "weight-norm", "none"):
        with pytest.raises(UserInputError, match="--weight-bits"):
            SchemeConfig(scheme, weight_bits=4)
    for bits in (1, 9, 0, True):
        with pytest.raises(UserInputError, match="2 to 8"):
            SchemeConfig("layer-max", weight_bits=bits)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5))


@pytest.mark.parametrize("scheme", ["layer-max", "channel-max"])
@pytest.mark.parametrize("bits", [3, 4])
def test_training_step_keeps_grid_and_fold_stores_it(scheme, bits):
    model = _net()
    apply_scheme(model, SchemeConfig(scheme, weight_bits=bits))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    before = [m.parametrizations.weight.original.detach().clone() for _, m, _ in reparametrized(model)]
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    for _, m, _ in reparametrized(model):
        assert m.parametrizations.weight.original.grad is not None
        assert m.parametrizations.weight.original.grad.abs().sum() > 0
    opt.step()
    after = [m.parametrizations.weight.original.detach() for _, m, _ in reparametrized(model)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    model.eval()
    L = 2 ** (bits - 1) - 1
    for target, m, p in reparametrized(model):
        n = p.normalize(m.parametrizations.weight.original)
        assert on_grid(n, bits)
    folded = fold_model(model, torch.randn(2, 3, 8, 8))
    for target, _ in [(t, m) for t, m, _ in reparametrized(model)]:
        stored = stored_tensor(folded.model.get_submodule(target.module_name), target.tensor_name)
        k = stored.double() * L
        assert (k - k.round()).abs().max() <= 1e-6
        assert stored.abs().max() <= 1.0
    with torch.no_grad():
        assert torch.allclose(folded.model(x), model(x), rtol=1e-4, atol=1e-5)
