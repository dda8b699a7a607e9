import pytest
import torch
from helpers import SPREAD, DeadChannel, MHANet, randomize
from torch import nn
from torch.nn.utils import parametrize

from wnconvert.convert.apply import apply_scheme, reparametrized, scheme_parameters
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.layout import ChannelLayout
from wnconvert.convert.schemes import SchemeConfig

SCHEMES = ["layer-max", "channel-max", "weight-std", "weight-norm"]


def _out(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", ["resnet18", "transposed", "mha_kdim", "vit_mha"])
def test_apply_preserves_function(name, scheme):
    factory, size = SPREAD[name]
    torch.manual_seed(0)
    model = randomize(factory())
    x = torch.randn(3, 3, size, size)
    before = _out(model, x)
    report = apply_scheme(model, SchemeConfig(scheme))
    assert report.applied, "nothing was reparametrized"
    after = _out(model, x)
    assert torch.allclose(after, before, rtol=0, atol=1e-5 * before.abs().max())


@pytest.mark.parametrize("scheme", ["layer-max", "channel-max"])
def test_normalized_weight_is_in_unit_range_and_reaches_one(scheme):
    model = randomize(SPREAD["transposed"][0]())
    apply_scheme(model, SchemeConfig(scheme))
    for target, module, p in reparametrized(model):
        n = p.normalize(module.parametrizations[target.tensor_name].original)
        assert n.abs().max() == 1.0, target
        if scheme == "channel-max":
            assert torch.all(p.layout.amax(n) == 1.0), target


def test_grouped_transposed_channels():
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2)
    layout = ChannelLayout.of(conv)
    w = conv.weight.detach()
    rows = layout.rows(w)
    assert rows.shape == (6, 2 * 9)
    # output channel g*3 + j is weight[g*2:(g+1)*2, j]
    assert torch.equal(rows[4], w[2:4, 1].reshape(-1))
    v = torch.arange(1.0, 7.0)
    scaled = layout.mul(w, v)
    assert torch.allclose(layout.rows(scaled), rows * v[:, None])
    assert torch.allclose(layout.div(scaled, v), w)


def test_layer_max_gradient_is_orthogonal_to_weight():
    """N(W) = W / max|W| is scale invariant, so <dL/dW, W> = 0 when the gradient flows through max."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    apply_scheme(lin, SchemeConfig("layer-max", gain="frozen"))
    lin(torch.randn(5, 6)).pow(2).sum().backward()
    w = lin.parametrizations.weight.original
    g, w = w.grad, w.detach()
    assert abs(float((g * w).sum())) < 1e-5 * float(g.norm() * w.norm())


def test_detached_scale_gradient_differs_only_at_the_max():
    grads = {}
    for mode in ("full", "detach"):
        torch.manual_seed(1)
        lin = nn.Linear(6, 4)
        apply_scheme(lin, SchemeConfig("layer-max", scale_grad=mode))
        torch.manual_seed(2)
        lin(torch.randn(5, 6)).pow(2).sum().backward()
        grads[mode] = lin.parametrizations.weight.original.grad.clone()
        w = lin.parametrizations.weight.original.detach()
    m = w.abs().amax()
    # full = detach - <detach, W>/max * sign(w_argmax) e_argmax: identical off the argmax element
    off = w.abs() != m
    assert torch.allclose(grads["full"][off], grads["detach"][off])
    assert not torch.allclose(grads["full"][~off], grads["detach"][~off])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dead_channels_stay_finite(scheme):
    model = randomize(DeadChannel())
    apply_scheme(model, SchemeConfig(scheme, gain="learned"))
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_gain_modes():
    lin = nn.Linear(4, 3)
    apply_scheme(lin, SchemeConfig("channel-max", gain="learned"))
    raw, affine = scheme_parameters(lin)
    assert len(raw) == 1 and len(affine) == 1 and affine[0].requires_grad
    lin2 = nn.Linear(4, 3)
    apply_scheme(lin2, SchemeConfig("channel-max", gain="frozen"))
    assert scheme_parameters(lin2)[1] == []
    assert "parametrizations.weight.0.gain" in lin2.state_dict()


def test_gain_none_changes_function_and_weight_std_needs_offset():
    torch.manual_seed(0)
    base = randomize(SPREAD["resnet18"][0]())
    x = torch.randn(2, 3, 32, 32)
    ref = _out(base, x)
    import copy
    m = copy.deepcopy(base)
    apply_scheme(m, SchemeConfig("weight-std", gain="none"))
    assert (_out(m, x) - ref).abs().max() > 1e-2 * ref.abs().max()
    m = copy.deepcopy(base)
    apply_scheme(m, SchemeConfig("weight-std", gain="frozen"))
    assert (_out(m, x) - ref).abs().max() < 1e-5 * ref.abs().max()


def test_exclusion_patterns_and_depthwise():
    import torchvision
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    report = apply_scheme(model, SchemeConfig("layer-max", exclude=("classifier.*",), skip_depthwise=True))
    assert "classifier.0.weight" in report.skipped and "classifier.3.weight" in report.skipped
    assert any(v == "depthwise conv skipped" for v in report.skipped.values())
    assert not parametrize.is_parametrized(model.classifier[0])
    assert parametrize.is_parametrized(model.features[0][0])


def test_attention_projections_are_reparametrized_weights():
    model = MHANet()
    report = apply_scheme(model, SchemeConfig("layer-max"))
    for t in ("attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj.weight"):
        assert t in report.applied


def test_bad_scheme_config():
    with pytest.raises(UserInputError, match="unknown scheme"):
        SchemeConfig("layer-maxx")
    with pytest.raises(UserInputError, match="gain"):
        SchemeConfig("layer-max", gain="frozn")
