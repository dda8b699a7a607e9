"""``--weight-range learned`` (convert/clip.py) and the ``scales`` optimizer group
(models/scale_group.py): step 0 unchanged, the LSQ gradient reaches the clip, the fold stays on the
grid, the floor holds, the scales learn alike under sgd and adamw, resume is exact, bad input."""

import copy
import json
import math

import pytest
import torch
import torchvision
from helpers import SYNTHETIC_32PX, assert_same_tensors, interrupt_and_resume
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from wnconvert.cli.main import app
from wnconvert.convert.apply import apply_scheme, reparametrized
from wnconvert.convert.clip import MIN_CLIP, MIN_LOG2_CLIP
from wnconvert.convert.configs import SchemeConfig
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.fakequant import on_grid
from wnconvert.convert.fold import FoldConfig, fold_model
from wnconvert.models.run.config_file import read_defaults
from wnconvert.models.train.optim import build_optimizer
from wnconvert.models.train.scale_group import scale_parameters
from wnconvert.models.train.train_config import TrainConfig

TINY = [*SYNTHETIC_32PX, "--samples", "2"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Flatten(), nn.LazyLinear(4))


def learned(model: nn.Module, scheme: str = "channel-max", bits: int = 4) -> nn.Module:
    model(torch.zeros(1, 3, 8, 8))  # materialize the lazy layer
    apply_scheme(model, SchemeConfig(scheme, weight_bits=bits, weight_range="learned"))
    return model


def clips(model: nn.Module) -> list[nn.Parameter]:
    return [p.clip.log2_clip for _, _, p in reparametrized(model)]


@pytest.mark.parametrize("scheme", ["layer-max", "channel-max"])
def test_step0_is_the_max_scheme(scheme):
    """At apply time c = max|W_c|: the same stored weights, scales and outputs as the max scheme."""
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    apply_scheme(a, SchemeConfig(scheme, weight_bits=4))
    apply_scheme(b, SchemeConfig(scheme, weight_bits=4, weight_range="learned"))
    assert torch.equal(a(x), b(x))
    for (_, ma, pa), (_, mb, pb) in zip(reparametrized(a), reparametrized(b)):
        sa, ga = pa.unit_parts(ma.parametrizations.weight.original)
        sb, gb = pb.unit_parts(mb.parametrizations.weight.original)
        assert torch.equal(sa, sb) and torch.equal(ga, gb)
        assert pb.clip.log2_clip.shape == ((ga.numel(),) if scheme == "channel-max" else ())


def test_lsq_gradient_reaches_the_clip():
    """d(alpha q(clamp(v)))/d alpha = q(v) - v inside, sign(v) clipped, times gain and alpha ln 2
    for the log2 parameter; W gets nothing where it is clipped."""
    model = learned(net(1))
    _, conv, p = reparametrized(model)[0]
    with torch.no_grad():
        p.clip.log2_clip.copy_(torch.linspace(-1.0, 0.0, 8))
    W = conv.parametrizations.weight.original
    G = torch.randn_like(W)
    (conv.weight * G).sum().backward()
    L = 7
    with torch.no_grad():
        alpha = torch.exp2(p.clip.log2_clip)
        m = W.abs().amax(dim=(1, 2, 3))
        v = W / (alpha * m).reshape(-1, 1, 1, 1)
        q = torch.round(v.clamp(-1, 1) * L) / L
        d = torch.where(v.abs() <= 1, q - v, torch.sign(v))
        expect = (G * d).sum(dim=(1, 2, 3)) * p.gain * alpha * math.log(2)
    torch.testing.assert_close(p.clip.log2_clip.grad, expect, rtol=1e-4, atol=1e-6)
    assert (p.clip.log2_clip.grad[:-1].abs() > 0).all()
    # clipped elements get no gradient, except each channel's argmax: it carries the path through
    # max|W_c| (W stays scale invariant, docs/gradients.md)
    top = W.abs() == m.reshape(-1, 1, 1, 1)
    clipped = (v.abs() > 1) & ~top
    assert clipped.any() and (W.grad[clipped] == 0).all() and (W.grad[~clipped] != 0).any()


def test_fold_is_on_the_grid():
    """After the clip has moved the fold stores weights on the 4-bit grid, |w| <= 1, and the
    folded model computes what the trained one does."""
    model = learned(net(2)).eval()
    with torch.no_grad():
        for c in clips(model):
            c.uniform_(-1.5, 0.0)
    x = torch.randn(3, 3, 8, 8)
    ref = model(x)
    result = fold_model(model, x, FoldConfig())
    for name, mod in result.model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            w = mod.weight.detach()
            assert w.abs().max() <= 1 and on_grid(w, 4), name
    assert result.max_stored <= 1 and result.max_rel_diff < 1e-5  # the per-layer certificate
    torch.testing.assert_close(result.model(x), ref, rtol=1e-5, atol=1e-6)


def test_collapse_is_held_at_the_floor():
    """A range pushed far below the floor: alpha is MIN_CLIP, nothing is NaN, and the gradient
    passes only in the direction that brings it back."""
    model = learned(net(3))
    with torch.no_grad():
        for c in clips(model):
            c.fill_(-1e4)
    out = model(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(out).all()
    _, conv, p = reparametrized(model)[0]
    assert torch.equal(p.clip.ratio(), torch.full((8,), MIN_CLIP))
    W = conv.parametrizations.weight.original
    for sign in (1.0, -1.0):
        p.clip.log2_clip.grad = None
        (sign * conv.weight.sum()).backward()
        g = p.clip.log2_clip.grad
        assert torch.isfinite(g).all() and torch.isfinite(W.grad).all()
        assert ((g < 0) | (g == 0)).all()  # only descent steps that raise a
        W.grad = None
    opt = torch.optim.SGD([p.clip.log2_clip], lr=1.0)
    for _ in range(3):  # a held parameter is never pushed further out
        opt.zero_grad()
        conv.weight.sum().backward()
        opt.step()
    assert (p.clip.log2_clip >= -1e4).all() and MIN_LOG2_CLIP == math.log2(MIN_CLIP)


def _one_step(model: nn.Module, optimizer: str, lr: float) -> list[torch.Tensor]:
    opt = build_optimizer(model, optimizer, lr=lr, weight_decay=0.0, scale_lr=0.01)
    before = [c.detach().clone() for c in clips(model)]
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))).square().mean().backward()
        opt.step()
    return [c.detach() - b for c, b in zip(clips(model), before)]


def test_scales_learn_alike_under_sgd_and_adamw():
    """The scales group takes Adam's step under every optimizer: the clips move by the same
    amounts under sgd and adamw (weights held still by a negligible lr, so both see the same
    gradients), about scale_lr per step, where a plain SGD step (lr 1e-3) of their gradient is
    orders of magnitude smaller."""
    a, b = learned(net(4)), learned(net(4))
    groups = build_optimizer(a, "sgd", lr=1e-3, weight_decay=0.0, scale_lr=0.01).param_groups
    assert groups[-1]["name"] == "scales" and len(groups[-1]["params"]) == 3
    assert {id(p) for p in groups[-1]["params"]} == {id(p) for p in scale_parameters(a)}
    da, db = _one_step(a, "sgd", 1e-12), _one_step(b, "adamw", 1e-12)
    for x, y in zip(da, db):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
    moved = torch.cat([d.flatten() for d in da]).abs()
    assert moved.max() > 0.015 and moved.max() <= 0.02 + 1e-6
    c = learned(net(4))  # without the group: plain SGD on the raw gradient
    opt = build_optimizer(c, "sgd", lr=1e-3, weight_decay=0.0)
    assert all(g["name"] != "scales" for g in opt.param_groups)
    c(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))).square().mean().backward()
    before = [x.detach().clone() for x in clips(c)]
    opt.step()
    plain = max(float((x.detach() - y).abs().max()) for x, y in zip(clips(c), before))
    assert plain < moved.max() / 10


def run(out, *extra):
    torch.manual_seed(0)
    return cli("finetune", "resnet18", *TINY, "--limit-train", "32", "--limit-val", "16", "--epochs", "2",
               "--batch-size", "16", "--scheme", "channel-max", "--weight-bits", "4", "--weight-range", "learned",
               "--act-bits", "8", "--optimizer", "sgd", "--lr", "0.01", "--scale-lr", "0.02", *extra, "--out", out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("learned") / "run"
    r = run(out)
    assert r.exit_code == 0, r.output
    return out


def test_run_records_and_exports_lossless(trained):
    m = json.loads((trained / "manifest.json").read_text())
    assert m["scheme"]["weight_range"] == "learned" and m["train"]["scale_lr"] == 0.02
    ck = load_file(str(trained / "checkpoint.safetensors"))
    moved = [v for k, v in ck.items() if k.endswith("clip.log2_clip")]
    assert moved and any((v != 0).any() for v in moved)  # the clips learned under sgd
    defaults = read_defaults(trained, {"weight_range", "scale_lr", "weight_bits"}, set())
    assert defaults == {"weight_range": "learned", "scale_lr": 0.02, "weight_bits": 4}  # --config repeats it
    r = cli("export", trained, "--precision", "int4", "--act-bits", "8")
    assert r.exit_code == 0, r.output
    r = cli("verify", trained, "--precision", "int4", "--limit", "8")
    assert r.exit_code == 0, r.output
    res = json.loads((trained / "report.json").read_text())["verify"]["quantized"]["int4"]
    assert res["passed"] and res["contract"] == "lossless-activations"
    r = cli("inspect", trained / "model.onnx", "--require-unit-range")
    assert r.exit_code == 0, r.output


def test_resume_is_exact(trained, tmp_path, monkeypatch):
    """Ctrl-C as epoch 2 starts, --resume: the clips, scales and weights of the uninterrupted run
    (the scales group's Adam moments are in the optimizer's checkpointed state)."""
    b = interrupt_and_resume(monkeypatch, run, tmp_path / "b")
    assert_same_tensors(load_file(str(trained / "checkpoint.safetensors")), b)


@pytest.mark.parametrize("extra, message", [
    (["--scheme", "weight-norm"], "has no grid"),
    (["--scheme", "channel-max"], "give --weight-bits"),
    (["--scheme", "channel-max", "--weight-bits", "4", "--scale-lr", "0"], "scale lr"),
])
def test_bad_input(tmp_path, extra, message):
    out = tmp_path / "run"
    r = cli("finetune", "resnet18", *TINY, "--limit-train", "8", "--epochs", "1", "--weight-range", "learned",
            *extra, "--out", out)
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()


def test_library_refusals():
    with pytest.raises(UserInputError, match="has no grid"):
        SchemeConfig("none", weight_range="learned")
    with pytest.raises(UserInputError, match="unknown --weight-range"):
        SchemeConfig("channel-max", weight_bits=4, weight_range="min")
    with pytest.raises(UserInputError, match="scale lr"):
        TrainConfig(scale_lr=float("nan")).validate()


class _Small(nn.Module):
    """conv-BN-ReLU twice, pooled, and a classifier: every layer kind a QLayer holds."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_po2_keeps_power_of_two_scales_and_is_bit_exact(tmp_path):
    """A learned range under --scale-format po2: moved clips, every scale of the file a power of
    two, the integer reference equal to onnxruntime, the training form the deployed layer."""
    import onnx
    from test_po2 import LEVELS, _ort_all, assert_training_form_is_deployed

    from wnconvert.convert.actquant import (
        ActQuantConfig,
        calibrate,
        export_qdq,
        freeze_bn,
        prepare_qat,
    )
    from wnconvert.convert.intref import compare_runs, run_integer
    from wnconvert.convert.quantize.target_rules import fixed_point_violations

    torch.manual_seed(0)
    m = _Small().eval()
    apply_scheme(m, SchemeConfig("channel-max", weight_bits=4, weight_range="learned"))
    with torch.no_grad():
        for c in clips(m):
            c.uniform_(-1.0, 0.0)
    q = prepare_qat(m, ActQuantConfig(8, scale_format="po2"))
    calibrate(q, [torch.randn(8, 3, 12, 12)])
    opt = build_optimizer(q, "sgd", lr=1e-2, weight_decay=0.0, scale_lr=0.05)
    for step in range(2):
        if step == 1:
            freeze_bn(q)
        q.train()
        loss = nn.functional.cross_entropy(q(torch.randn(8, 3, 12, 12)), torch.randint(0, 4, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()
    path = tmp_path / "w4a8.onnx"
    export_qdq(q, path, example_shape=(1, 3, 12, 12))
    assert fixed_point_violations(onnx.load(str(path))) == []
    x = torch.randn(4, 3, 12, 12)
    ref = run_integer(path, x.numpy())
    assert ref.integer_only
    for level in LEVELS:
        assert compare_runs(ref, _ort_all(path, list(ref.tensors), x.numpy(), level)) is None, level
    assert_training_form_is_deployed(q, x)
