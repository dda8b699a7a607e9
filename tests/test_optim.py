"""Optimizer groups, eps-shifted decay, LARS and the schedule (models/train/optim.py)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from wnconvert.convert.apply import apply_scheme, scheme_parameters
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.models.train import optim
from wnconvert.models.train.optim import LARS, WarmupCosine, build_optimizer, param_groups, shifted_l2_grad

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def reparam_net(gain: str = "learned") -> nn.Sequential:
    net = tiny_net()
    apply_scheme(net, SchemeConfig("layer-max", gain=gain, exclude=("8",)))  # leave the head plain
    return net


def groups_by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def ids(params) -> set[int]:
    return {id(p) for p in params}


# -- eps-shifted decay -------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1e-4, 0.3, 5.0])  # below eps, between, far above
def test_shifted_grad_matches_autograd(scale: float) -> None:
    torch.manual_seed(1)
    lam, eps = 0.05, 1e-2
    w = (torch.randn(6, 3, 3, 3, dtype=torch.float64) * scale).requires_grad_()
    (0.5 * lam * (torch.linalg.vector_norm(w) - eps) ** 2).backward()
    closed = shifted_l2_grad(w.detach(), lam, eps)
    torch.testing.assert_close(closed, w.grad, rtol=1e-10, atol=1e-14)


def test_shifted_grad_of_zero_tensor_is_zero() -> None:
    g = shifted_l2_grad(torch.zeros(4, 4), 0.1, 1e-3)
    assert torch.equal(g, torch.zeros(4, 4))


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


def test_eps_shifted_sgd_step_is_coupled_decay() -> None:
    net = reparam_net()
    lr, lam, eps = 0.1, 0.01, 0.5
    opt = build_optimizer(net, "sgd", lr=lr, momentum=0.0, weight_decay=lam, wd_mode="eps-shifted", wd_eps=eps)
    raw, affine = scheme_parameters(net)
    before = [p.detach().clone() for p in raw]
    gains = [p.detach().clone() for p in affine]
    _zero_grads(net)
    opt.step()
    for p, w in zip(raw, before):
        torch.testing.assert_close(p.detach(), w - lr * shifted_l2_grad(w, lam, eps))
    for p, g in zip(affine, gains):  # gains are never decayed
        assert torch.equal(p.detach(), g)


def test_eps_shifted_adamw_step_is_decoupled_decay() -> None:
    net = reparam_net()
    lr, lam, eps = 0.01, 0.1, 0.5
    opt = build_optimizer(net, "adamw", lr=lr, weight_decay=lam, wd_mode="eps-shifted", wd_eps=eps)
    raw, _ = scheme_parameters(net)
    before = [p.detach().clone() for p in raw]
    _zero_grads(net)  # Adam's own update is exactly zero for a zero gradient
    opt.step()
    for p, w in zip(raw, before):
        torch.testing.assert_close(p.detach(), w - lr * shifted_l2_grad(w, lam, eps))


# -- groups ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["l2", "eps-shifted", "none"])
def test_no_decay_on_norm_bias_gain(mode: str) -> None:
    net = reparam_net()
    lam = 1e-3
    groups = groups_by_name(param_groups(net, weight_decay=lam, wd_mode=mode, wd_eps=1e-3, decoupled=False))
    raw, affine = scheme_parameters(net)
    assert len(raw) == 2 and len(affine) == 2  # two convs reparametrized, learned gains
    no_decay = ids(groups["no_decay"]["params"])
    expected_no_decay = ids(affine) | ids([net[0].bias, net[8].bias]) | ids(net[1].parameters()) \
        | ids(net[4].parameters())
    assert no_decay == expected_no_decay
    assert groups["no_decay"]["weight_decay"] == 0 and groups["no_decay"]["shifted_wd"] == 0
    assert groups["no_decay"]["trust"] is False
    assert ids(groups["reparam"]["params"]) == ids(raw)
    assert ids(groups["decay"]["params"]) == ids([net[8].weight])  # excluded layer: plain L2
    assert groups["decay"]["weight_decay"] == lam
    reparam = groups["reparam"]
    assert (reparam["weight_decay"], reparam["shifted_wd"]) == {
        "l2": (lam, 0.0), "eps-shifted": (0.0, lam), "none": (0.0, 0.0)}[mode]
    every = [p for g in groups.values() for p in g["params"]]
    assert len(every) == len(ids(every)) == len(list(net.parameters()))


def test_frozen_gain_is_not_a_parameter_and_frozen_params_are_skipped() -> None:
    net = reparam_net(gain="frozen")
    net[1].weight.requires_grad_(False)
    groups = param_groups(net, weight_decay=1e-4, wd_mode="l2", wd_eps=1e-3, decoupled=False)
    every = ids(p for g in groups for p in g["params"])
    assert id(net[1].weight) not in every
    assert all(id(p) in every for p in scheme_parameters(net)[0])


@pytest.mark.parametrize("mode", ["l2", "none"])
def test_l2_vs_none(mode: str) -> None:
    net = reparam_net()
    lr, lam = 0.1, 0.01
    opt = build_optimizer(net, "sgd", lr=lr, momentum=0.0, weight_decay=lam, wd_mode=mode)
    raw, _ = scheme_parameters(net)
    before = [p.detach().clone() for p in raw]
    head, bn = net[8].weight.detach().clone(), net[1].weight.detach().clone()
    _zero_grads(net)
    opt.step()
    factor = 1 - lr * lam if mode == "l2" else 1.0
    for p, w in zip(raw, before):
        torch.testing.assert_close(p.detach(), w * factor)
    torch.testing.assert_close(net[8].weight.detach(), head * (1 - lr * lam))  # always plain L2
    assert torch.equal(net[1].weight.detach(), bn)


def test_adamw_decay_is_decoupled() -> None:
    net = tiny_net()
    opt = build_optimizer(net, "adamw", lr=0.01, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    head = net[8].weight.detach().clone()
    _zero_grads(net)
    opt.step()
    torch.testing.assert_close(net[8].weight.detach(), head * (1 - 0.01 * 0.1))


def test_bad_names_are_user_errors() -> None:
    with pytest.raises(UserInputError):
        build_optimizer(tiny_net(), "rmsprop", lr=0.1, weight_decay=0.0)
    with pytest.raises(UserInputError):
        build_optimizer(tiny_net(), "sgd", lr=0.1, weight_decay=0.0, wd_mode="l1")
    with pytest.raises(UserInputError):
        build_optimizer(tiny_net(), "adamw", lr=0.1, weight_decay=0.0, nesterov=True)


# -- LARS --------------------------------------------------------------------------------------

def test_lars_matches_hand_computation() -> None:
    torch.manual_seed(2)
    w = nn.Parameter(torch.randn(5, 4))
    b = nn.Parameter(torch.randn(5))
    lr, mom, wd, eta = 0.5, 0.9, 1e-2, 0.02
    opt = LARS([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0, "trust": False}],
               lr=lr, momentum=mom, trust_coefficient=eta)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(5, 4), torch.randn(5)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    ratio = eta * w0.norm() / (gw.norm() + wd * w0.norm())
    d_w = ratio * (gw + wd * w0)
    torch.testing.assert_close(w.detach(), w0 - lr * d_w)
    torch.testing.assert_close(b.detach(), b0 - lr * gb)  # excluded group: plain SGD momentum

    # second step: momentum buffer = mom * d_1 + d_2
    w1 = w.detach().clone()
    gw2 = torch.randn(5, 4)
    w.grad, b.grad = gw2.clone(), None
    opt.step()
    ratio2 = eta * w1.norm() / (gw2.norm() + wd * w1.norm())
    buf = mom * d_w + ratio2 * (gw2 + wd * w1)
    torch.testing.assert_close(w.detach(), w1 - lr * buf)


def test_lars_ratio_is_one_for_zero_weight() -> None:
    w = nn.Parameter(torch.zeros(3, 3))
    opt = LARS([w], lr=0.1, momentum=0.0)
    w.grad = torch.ones(3, 3)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3, 3), -0.1))


def test_lars_groups_exclude_norm_bias_gain() -> None:
    opt = build_optimizer(reparam_net(), "lars", lr=0.01, weight_decay=1e-4)
    trust = {g["name"]: g["trust"] for g in opt.param_groups}
    assert trust == {"reparam": True, "decay": True, "no_decay": False}


# -- schedule ----------------------------------------------------------------------------------

def test_warmup_then_cosine() -> None:
    f = WarmupCosine(total_steps=10, warmup_steps=4)
    assert [f(k) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert 0 < f(9) < 0.1 and f(10) == pytest.approx(0.0)
    g = WarmupCosine(total_steps=4)
    assert g(0) == 1.0 and g(2) == pytest.approx(0.5)


def test_warmup_then_constant() -> None:
    f = WarmupCosine(total_steps=10, warmup_steps=2, shape="constant")
    assert [f(k) for k in range(11)] == [0.5] + [1.0] * 10
    with pytest.raises(UserInputError, match="unknown schedule 'step'"):
        WarmupCosine(total_steps=10, shape="step")


# -- documentation -----------------------------------------------------------------------------

def test_defaults_match_docs() -> None:
    text = DOCS.read_text()
    row = r"^\|\s*`?(sgd|adamw|lars)`?\s*\|\s*`?([0-9.e-]+)`?\s*\|\s*`?([0-9.e-]+)`?\s*\|"
    rows = {m[0]: (float(m[1]), float(m[2])) for m in re.findall(row, text, re.M)}
    assert rows == {name: (d.lr, d.weight_decay) for name, d in optim.DEFAULTS.items()}
    eps = re.search(r"default\s+(?:ε|eps)[^0-9]*=\s*`?([0-9.e-]+)", text)
    assert eps and float(eps.group(1)) == optim.DEFAULT_WD_EPS
    trust = re.search(r"trust coefficient[^0-9]*≈\s*`?([0-9.]+)", text)
    assert trust and float(trust.group(1)) == pytest.approx(optim.LARS_TRUST, rel=0.02)
