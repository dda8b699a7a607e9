"""Small models and utilities shared by the tests."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import numpy_helper
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typer.testing import CliRunner

import wnconvert.models.run.run as run_mod
from wnconvert.cli.main import app


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms, and every parameter
    that torchvision initializes to zero (ViT head, biases) a random value."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    for p in model.parameters():
        if p.abs().max() == 0:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


class SharedOutput(nn.Module):
    """conv -> bn, but the conv output is also added after the bn: the scale must not move."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y
        return self.head(z.mean((2, 3)))


class Transposed(nn.Module):
    """Grouped transposed conv + Conv1d + Conv3d paths."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1, groups=2)
        self.bn_up = nn.BatchNorm2d(6)
        self.c1 = nn.Conv1d(6, 4, 3, padding=1)
        self.c3 = nn.Conv3d(1, 2, 3, padding=1)
        self.head = nn.Linear(4 + 2, 7)

    def forward(self, x):
        y = self.bn_up(self.up(torch.relu(self.bn(self.down(x)))))
        a = self.c1(y.flatten(2)).mean(-1)
        b = self.c3(y[:, :1].unsqueeze(1)).mean((2, 3, 4))
        return self.head(torch.cat([a, b], 1))


class DeadChannel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.conv.weight[2].zero_()
            self.fc.weight[1].zero_()

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def tiny_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


def tiny_swin() -> nn.Module:
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                              num_heads=[1, 2], window_size=[2, 2], num_classes=10)


class MHANet(nn.Module):
    """nn.MultiheadAttention with separate q/k/v projections (kdim != embed_dim)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.ctx = nn.Linear(12, 8)
        self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        t = x.reshape(x.shape[0], -1, 12)  # (N, tokens, 12)
        q, kv = self.embed(t), self.ctx(t)
        y, _ = self.attn(q, kv, kv, need_weights=False)
        return self.head(self.norm(y + q).mean(1))


SPREAD = {
    # name: (factory, image size) — residual, depthwise, grouped, dense concat, LayerNorm + Linear,
    # attention (MHA in ViT, direct weight use in Swin), transposed/1d/3d convs, shared outputs.
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 32),
    "resnext_grouped": (lambda: torchvision.models.regnet_x_400mf(num_classes=10), 32),
    "densenet_concat": (lambda: torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2),
                                                            num_init_features=16, num_classes=10), 32),
    "convnext_ln_linear": (lambda: torchvision.models.convnext.ConvNeXt(
        [torchvision.models.convnext.CNBlockConfig(16, 32, 1), torchvision.models.convnext.CNBlockConfig(32, None, 1)],
        num_classes=10), 32),
    "vit_mha": (tiny_vit, 32),
    "swin_direct_weights": (tiny_swin, 32),
    "mha_kdim": (MHANet, 8),
    "transposed": (Transposed, 16),
    "shared_output": (SharedOutput, 8),
    "dead_channel": (DeadChannel, 8),
}


@pytest.fixture
def one_thread():
    """Tiny tensors: thread start-up and contention cost more than they save, and one thread keeps
    CPU results bitwise repeatable. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``
    after ``from helpers import one_thread``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scale_first_dequantized_weight(path, factor: float) -> None:
    """Multiply the scale of the first initializer-fed DequantizeLinear of the ONNX file ``path``."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    scale = inits[dq.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(factor), scale.name))
    onnx.save(model, str(path))


def interrupt_and_resume(monkeypatch, start, out) -> dict:
    """Start an ``--act-bits`` run with ``start(out, "--no-export")`` (a CLI call), stop it with
    Ctrl-C as epoch 2 starts, continue it with ``--resume``; returns its checkpoint tensors."""
    real = run_mod.freeze_bn_hook

    def interrupting(qat, act, epochs):
        hook = real(qat, act, epochs)

        def wrapped(epoch):
            if epoch == 2:
                raise KeyboardInterrupt
            hook(epoch)
        return wrapped
    monkeypatch.setattr(run_mod, "freeze_bn_hook", interrupting)
    r = start(out, "--no-export")
    assert r.exit_code != 0 and "--resume" in r.output, r.output
    monkeypatch.setattr(run_mod, "freeze_bn_hook", real)
    run_mod.finetune_process(run_mod.resume_config(out), resume=True)
    return load_file(str(out / "checkpoint.safetensors"))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


# a run of a randomly initialised 10-class network at 32 px on synthetic data, on the CPU (the
# options every tiny test run shares; each test adds its own sizes and settings)
SYNTHETIC_32PX = ["--weights", "none", "--image-size", "32", "--num-classes", "10", "--data", "synthetic:10",
                  "--workers", "0", "--device", "cpu"]


def cli(*args, code: int = 0):
    """``wnconvert ARGS`` in process; asserts its exit code."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r
