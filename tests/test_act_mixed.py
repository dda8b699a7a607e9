"""``finetune --act-bits --mixed-precision``: operations without an integer form (hardswish,
hardsigmoid, SiLU, sigmoid, GELU, tanh, the squeeze-excite multiply) stay in float between a
DequantizeLinear and a QuantizeLinear; the file still reproduces the fake-quant model under the
lossless-activations contract, and report.json names every float operation."""

import json

import onnx
import pytest
import torch
from test_act_run import TINY, cli
from torch import nn
from torchvision.ops import StochasticDepth

from wnconvert.convert.actquant import (
    ActQuantConfig,
    act_points,
    calibrate,
    check_lossless_activations,
    export_qdq,
    prepare_qat,
)
from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.schemes import SchemeConfig

SHAPE = (1, 3, 16, 16)
MIXED = ActQuantConfig(8, mixed_precision=True)


class Islands(nn.Module):
    """Every float operation once, each on quantized integers: conv -> op -> conv ..., and a
    squeeze-excite style multiply of two quantized tensors."""

    def __init__(self, gelu: str = "none") -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(6))
        self.acts = nn.ModuleList([nn.Hardswish(), nn.SiLU(inplace=True), nn.GELU(approximate=gelu), nn.Tanh(),
                                   nn.Hardsigmoid()])
        self.gate = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        for conv, act in zip(self.convs, self.acts):
            x = act(conv(x))
        x = self.convs[5](x)
        x = x * torch.sigmoid(self.gate(nn.functional.adaptive_avg_pool2d(x, 1)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _islands(gelu: str = "none") -> nn.Module:
    torch.manual_seed(0)
    m = Islands(gelu)
    apply_scheme(m, SchemeConfig("channel-max", weight_bits=8))
    return m.eval()


def test_refused_without_mixed_precision():
    with pytest.raises(UserInputError, match=r"Hardswish \(node 'acts_0'\) has no integer form; --mixed-precision"):
        prepare_qat(_islands(), ActQuantConfig(8))


def test_gelu_tanh_approximation_refused():
    with pytest.raises(UserInputError, match="approximate='tanh'"):
        prepare_qat(_islands("tanh"), MIXED)


def test_po2_and_mixed_precision_refused():
    with pytest.raises(UserInputError, match="choose one"):
        ActQuantConfig(8, scale_format="po2", mixed_precision=True)


def test_every_float_op_is_one_point_and_one_island(tmp_path):
    q = prepare_qat(_islands(), MIXED)
    calibrate(q, [torch.randn(8, *SHAPE[1:])])
    q.eval()
    floats = {p.name: p.op for p in act_points(q) if p.kind == "float"}
    assert sorted(floats.values()) == ["gelu", "hardsigmoid", "hardswish", "mul", "sigmoid", "silu", "tanh"]
    # sigmoid-like outputs are unsigned, the others signed
    signed = {p.op: p.signed for p in act_points(q) if p.kind == "float"}
    assert not signed["hardsigmoid"] and not signed["sigmoid"] and signed["hardswish"] and signed["gelu"]
    info = export_qdq(q, tmp_path / "m.onnx", example_shape=SHAPE)
    assert info.points == [p.name for p in act_points(q)]  # fake-quant points = Q/DQ points
    g = onnx.load(str(tmp_path / "m.onnx")).graph
    producer = {o: n for n in g.node for o in n.output}
    for point in floats:  # Q_<point> reads the float op, which reads dequantized integers only
        op = producer[next(n for n in g.node if n.name == f"Q_{point}").input[0]]
        assert op.op_type in ("HardSwish", "HardSigmoid", "Mul", "Sigmoid", "Tanh"), op.op_type
    x = torch.randn(16, *SHAPE[1:], generator=torch.Generator().manual_seed(3))
    res = check_lossless_activations(q, tmp_path / "m.onnx", x)
    assert res["passed"], res["failures"]
    assert set(floats) <= set(res["levels"]["on"]["points"])


def test_wrong_float_op_in_the_file_fails(tmp_path):
    """The contract sees the float island: hardswish written as a hardsigmoid's formula fails."""
    q = prepare_qat(_islands(), MIXED)
    calibrate(q, [torch.randn(8, *SHAPE[1:])])
    q.eval()
    export_qdq(q, tmp_path / "m.onnx", example_shape=SHAPE)
    model = onnx.load(str(tmp_path / "m.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "HardSwish")
    node.op_type = "HardSigmoid"
    onnx.save(model, str(tmp_path / "m.onnx"))
    res = check_lossless_activations(q, tmp_path / "m.onnx", torch.randn(8, *SHAPE[1:]))
    assert not res["passed"] and any("acts_0" in f for f in res["failures"]), res["failures"]


def test_mobilenet_v3_run_exports_and_verifies(tmp_path):
    """A tiny MobileNetV3 run end to end from the CLI: trained with hardswish, hardsigmoid and the
    squeeze-excite multiply in float, exported with its trained scales, verified lossless."""
    out = tmp_path / "run"
    torch.manual_seed(0)
    r = cli("finetune", "mobilenet_v3_small", *TINY, "--limit-train", "32", "--limit-val", "16", "--epochs", "1",
            "--batch-size", "16", "--weight-bits", "8", "--act-bits", "8", "--mixed-precision", "--out", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["act"]["mixed_precision"] is True
    report = json.loads((out / "report.json").read_text())  # finetune wrote and checked model.int8.onnx
    assert report["deployed"]["file"] == "model.int8.onnx" and report["deployed"]["passed"]
    entry = report["quantized"]["int8"]
    assert entry["mixed_precision"] is True
    assert set(entry["float_ops"].values()) == {"hardswish", "hardsigmoid", "mul"}
    assert set(entry["float_ops"]) <= set(entry["points"])
    r = cli("verify", out, "--precision", "int8", "--limit", "16")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["verify"]["quantized"]["int8"]["passed"]


class DropPath(nn.Module):
    """A residual block with stochastic depth on its branch, as in torchvision's EfficientNet."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.drop = StochasticDepth(0.5, "row")
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        x = x + self.drop(self.conv(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_stochastic_depth_follows_the_mode(tmp_path):
    """Captured from a model in training mode, stochastic depth still drops in training only: the
    eval-mode fake-quant model is deterministic and is the exported file."""
    torch.manual_seed(0)
    m = DropPath()
    apply_scheme(m, SchemeConfig("channel-max", weight_bits=8))
    q = prepare_qat(m.train(), ActQuantConfig(8))
    x = torch.randn(16, *SHAPE[1:], generator=torch.Generator().manual_seed(4))
    calibrate(q, [x])
    q.train()
    assert not torch.equal(q(x), q(x))  # training: rows dropped at random
    q.eval()
    assert torch.equal(q(x), q(x))
    export_qdq(q, tmp_path / "m.onnx", example_shape=SHAPE)
    assert check_lossless_activations(q, tmp_path / "m.onnx", x)["passed"]
