"""``--rounding tflite``: the eval-mode fake-quant model of a po2 network holds, at every tensor, the
integers TensorFlow Lite Micro computes for the same network written as a .tflite file (conv+BN+ReLU,
conv+BN, residual ADD+ReLU, global MEAN, FULLY_CONNECTED); the option's refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("tflite_micro")

from tflite_tiny import Builder

from wnconvert.convert.actquant import (
    ActQuantConfig,
    calibrate,
    deployed_parts,
    prepare_qat,
    quantizers,
)
from wnconvert.convert.actquant.prepare import act_points
from wnconvert.convert.actquant.tflite_points import rounding_mode
from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.schemes import SchemeConfig


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(a + self.bn2(self.conv2(a)))
        return self.fc(torch.flatten(self.pool(y), 1))


def _qat(rounding: str, seed: int = 0):
    torch.manual_seed(seed)
    m = Tiny()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    apply_scheme(m, SchemeConfig("channel-max", weight_bits=8))
    q = prepare_qat(m, ActQuantConfig(8, scale_format="po2", rounding=rounding))
    calibrate(q, [torch.randn(16, 3, 12, 12)])
    return q.eval()


def _point_integers(qat, x) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every point's integers (read from its output) and the logits of the eval-mode model."""
    seen = {}
    hooks = [q.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(
        name, torch.round(out / mod.scale()).to(torch.int64).numpy()))
        for name, q in quantizers(qat).items()]
    try:
        with torch.no_grad():
            logits = qat(x).numpy()
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def _to_tflite(qat) -> tuple[bytes, list[str]]:
    """The deployed network as an int8 .tflite, every point's tensor a subgraph output (in
    ``act_points`` order, the input excepted)."""
    qs = quantizers(qat)
    pts = {p.name: p for p in act_points(qat)}
    layers = {q.name: q for q in qat.modules() if hasattr(q, "accumulator_scales")}

    def zp(name):
        return 0 if pts[name].signed else -128

    def sc(name):
        return qs[name].scale_value()

    b = Builder()
    x = b.tensor((1, 12, 12, 3), np.int8, sc("input"), 0, name="input")
    t = {"input": x}

    def conv(point, src, layer, relu):
        d = deployed_parts(layers[layer])
        w = d.weight_int.transpose(0, 2, 3, 1).astype(np.int8)
        t[point] = b.conv(t[src], w, d.weight_scale, d.bias_int.astype(np.int32), sc(point), zp(point), relu=relu)

    names = list(pts)
    p_conv1, p_conv2, p_add, p_pool, p_fc = names[1:]
    conv(p_conv1, "input", "conv1", True)
    conv(p_conv2, p_conv1, "conv2", False)
    t[p_add] = b.add(t[p_conv1], t[p_conv2], sc(p_add), zp(p_add), relu=True)
    t[p_pool] = b.mean(t[p_add], sc(p_pool), zp(p_pool))
    d = deployed_parts(layers["fc"])
    t[p_fc] = b.fully_connected(t[p_pool], d.weight_int.astype(np.int8), d.weight_scale,
                                d.bias_int.astype(np.int32), sc(p_fc), zp(p_fc))
    outs = names[1:]
    return b.finish([x], [t[n] for n in outs]), outs


def _micro_points(data: bytes, outs: list[str], k_in: np.ndarray, qat) -> dict[str, np.ndarray]:
    from tflite_micro import runtime

    pts = {p.name: p for p in act_points(qat)}
    it = runtime.Interpreter.from_bytes(data)
    it.set_input(k_in.astype(np.int8), 0)
    it.invoke()
    return {n: it.get_output(i).astype(np.int64) + (0 if pts[n].signed else 128) for i, n in enumerate(outs)}


def _nhwc(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a.reshape(a.shape[0], -1)


def _compare(qat, images: int = 6) -> dict[str, int]:
    """Per point: elements where the eval-mode model and TensorFlow Lite Micro differ."""
    data, outs = _to_tflite(qat)
    torch.manual_seed(1)
    differ = dict.fromkeys(outs, 0)
    for _ in range(images):
        x = torch.randn(1, 3, 12, 12)
        ours, _ = _point_integers(qat, x)
        micro = _micro_points(data, outs, _nhwc(ours["input"]), qat)
        for n in outs:
            differ[n] += int((_nhwc(ours[n]) != micro[n]).sum())
    return differ


def test_tflite_rounding_equals_tflite_micro_at_every_tensor():
    qat = _qat("tflite")
    differ = _compare(qat)
    assert set(differ.values()) == {0}, differ
    # the same network in ONNX's rounding differs from TFLite Micro somewhere (double rounding, ADD)
    with rounding_mode(qat, "onnx"):
        assert sum(_compare(qat).values()) > 0


def test_training_mode_is_unchanged():
    a, b = _qat("tflite"), _qat("onnx")
    x = torch.randn(4, 3, 12, 12)
    a.train(), b.train()
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("kwargs, words", [
    ({"scale_format": "float", "rounding": "tflite"}, "needs --scale-format po2"),
                                           ({"scale_format": "po2", "rounding": "x"}, "unknown --rounding")])
def test_refusals(kwargs, words):
    with pytest.raises(UserInputError, match=words):
        ActQuantConfig(8, **kwargs)
