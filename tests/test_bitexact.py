"""The bit-exact contract (convert/actquant/bitexact.py): a QAT model whose every scale, weight
scale and folded BatchNorm factor is forced to a power of two, exported with export_qdq, gives the
same integers in PyTorch, the integer reference and onnxruntime (optimizations off and on)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_act_run import TINY, cli
from torch import nn

from wnconvert.convert.actquant import (
    ActQuantConfig,
    act_points,
    calibrate,
    check_bit_exact,
    deployed_parts,
    export_qdq,
    prepare_qat,
    qlayers,
    quantizers,
)
from wnconvert.convert.apply import apply_scheme, reparam_of
from wnconvert.convert.intref import is_power_of_two
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.models.run.rundir import RunDir

SHAPE = (1, 3, 16, 16)


class _Net(nn.Module):
    """conv+BN+ReLU, max pooling, conv+BN, residual add+ReLU, global average pooling (64 values:
    a power-of-two divisor), flatten, linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.avg, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        p = self.pool(torch.relu(self.bn1(self.conv1(x))))
        y = torch.relu(self.bn2(self.conv2(p)) + p)
        return self.fc(torch.flatten(self.avg(y), 1))


def _images(n: int, shape=SHAPE, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, *shape[1:], generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _force_po2(q: torch.fx.GraphModule, seed: int = 0) -> torch.fx.GraphModule:
    """Make every scale of the calibrated QAT model ``q`` a power of two: layer-max B-bit weights
    with gain L/2^(B-1), L = 2^(B-1) - 1 (weight scale 2^(1-B) before BatchNorm); BatchNorm with
    variance 1 - eps and gamma 2^e (folded factor 2^e, to float32 precision); activation scales
    rounded to 2^k."""
    g = torch.Generator().manual_seed(seed)
    for layer in qlayers(q):
        p = reparam_of(layer.layer, "weight")
        top = 2 ** (p.weight_bits - 1)
        p.gain.fill_((top - 1) / top)
        bn = layer.bn
        if bn is not None:
            bn.running_var.fill_(1 - bn.eps)
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.weight.copy_(2.0 ** torch.randint(-1, 2, (bn.num_features,), generator=g).float())
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
    for quant in quantizers(q).values():
        quant.log2_scale.copy_(torch.round(quant.log2_scale))
    q.eval()
    for layer in qlayers(q):
        d = deployed_parts(layer)
        assert all(is_power_of_two(s) is not None for s in d.weight_scale), layer.name
    return q


def _prepared(net: nn.Module, calib: torch.Tensor, weight_bits: int = 8, act_bits: int = 8):
    apply_scheme(net, SchemeConfig("layer-max", weight_bits=weight_bits))
    q = prepare_qat(net.eval(), ActQuantConfig(act_bits, "frozen"))
    calibrate(q, [calib])
    return q


def _po2_file(directory, weight_bits: int = 8, act_bits: int = 8):
    torch.manual_seed(0)
    q = _force_po2(_prepared(_Net(), _images(16, seed=2), weight_bits, act_bits))
    path = directory / f"w{weight_bits}a{act_bits}.onnx"
    export_qdq(q, path, example_shape=SHAPE)
    return q, path


@pytest.fixture(scope="module")
def po2(tmp_path_factory):
    return _po2_file(tmp_path_factory.mktemp("bitexact"))


def _save_changed(path, out, change) -> None:
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        new = change(init.name, numpy_helper.to_array(init))
        if new is not None:
            init.CopyFrom(numpy_helper.from_array(new, init.name))
    onnx.save(model, str(out))


def test_po2_file_is_bit_exact_in_all_four(po2):
    q, path = po2
    rep = check_bit_exact(q, path, _images(20), batch_size=8)
    assert rep.passed, rep.failures
    assert rep.first_difference is None and rep.images == 20
    names = [c.tensor for c in rep.layers]
    assert names == [f"{p.name}_q" for p in act_points(q)] + ["logits"]
    assert {c.op for c in rep.layers} >= {"QuantizeLinear", "Conv", "Add", "GlobalAveragePool", "Gemm"}
    for c in rep.layers:
        assert c.elements > 0 and c.differ == 0 and not any(c.mismatches.values()), c
        assert c.integer_only and not c.over_2_24 and not c.missing, c
        assert c.sources == ["pytorch", "intref", "ort_off", "ort_on"], c
    conv2 = next(c for c in rep.layers if c.point == "conv2")
    assert conv2.elements == 20 * 8 * 8 * 8 and conv2.max_abs_acc > 0
    d = rep.to_dict()
    assert d["contract"] == "bit-exact" and d["passed"] and d["first_difference"] is None
    assert d["layers"][0]["mismatches"] == {"pytorch/intref": 0, "pytorch/ort_off": 0, "pytorch/ort_on": 0,
                                            "intref/ort_off": 0, "intref/ort_on": 0, "ort_off/ort_on": 0}


@pytest.mark.parametrize("weight_bits, act_bits", [(4, 8), (4, 4)])
def test_4bit_files_are_bit_exact(weight_bits, act_bits, tmp_path):
    q, path = _po2_file(tmp_path, weight_bits, act_bits)
    assert onnx.load(str(path)).opset_import[0].version == 21
    rep = check_bit_exact(q, path, _images(8))
    assert rep.passed, rep.failures
    assert all(c.elements > 0 and c.integer_only for c in rep.layers)


def test_float_scales_are_not_integer_only(tmp_path):
    """The same network calibrated but not forced to powers of two: every conv/linear requantizes by
    a float multiplier, which the contract refuses by name."""
    torch.manual_seed(0)
    q = _prepared(_Net(), _images(16, seed=2)).eval()
    path = tmp_path / "float.onnx"
    export_qdq(q, path, example_shape=SHAPE)
    rep = check_bit_exact(q, path, _images(8))
    assert not rep.passed
    flagged = [c.tensor for c in rep.layers if not c.integer_only]
    assert {"conv1_q", "conv2_q", "fc_q"} <= set(flagged)
    assert any(f.startswith("Gemm 'fc' (tensor 'fc_q') is not integer-only: requantization multiplier")
               for f in rep.failures), rep.failures


def test_one_bit_of_one_weight_fails_naming_the_layer(po2, tmp_path):
    q, path = po2
    bad = tmp_path / "flipped.onnx"

    def flip(name, a):
        if name != "conv2_w_q":
            return None
        a = a.copy()
        i = int(np.argmax(np.abs(a.reshape(-1)) < 100))   # stays inside the weight grid
        a.reshape(-1)[i] ^= 1
        return a
    _save_changed(path, bad, flip)
    rep = check_bit_exact(q, bad, _images(20))
    assert not rep.passed
    first = rep.first_difference
    assert first.tensor == "conv2_q" and first.node == "conv2" and first.differ > 0
    # the file's integers: the reference and onnxruntime agree with each other, not with PyTorch
    assert first.mismatches["intref/ort_off"] == first.mismatches["intref/ort_on"] == 0
    assert first.mismatches["pytorch/intref"] == first.differ
    assert rep.failures[0].startswith(f"first difference at Conv 'conv2' (tensor 'conv2_q'): {first.differ} of")
    assert all(c.differ == 0 for c in rep.layers[:[c.tensor for c in rep.layers].index("conv2_q")])


def test_an_activation_scale_doubled_fails_at_that_point(po2, tmp_path):
    q, path = po2
    bad = tmp_path / "scale.onnx"
    victim = "conv1"    # the scale of its QuantizeLinear; its DequantizeLinear keeps the trained one
    _save_changed(path, bad, lambda name, a: a * np.float32(2) if name == f"{victim}_scale" else None)
    rep = check_bit_exact(q, bad, _images(8))
    assert not rep.passed and rep.first_difference.tensor == f"{victim}_q"
    assert rep.first_difference.mismatches["pytorch/ort_on"] > 0
    assert "conv1_q" in rep.failures[0]


class _Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 2)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


@torch.no_grad()
def test_accumulator_beyond_2_24_is_flagged_and_labelled(tmp_path):
    """acc = 127·1 + 33030016 = 31.5·2^20 − 1, odd and above 2^24, shifted by 20: the integers give
    31; every float32 computation rounds the accumulator to the tie 31.5·2^20 and gives 32."""
    net = _Wide()
    net.fc.weight.copy_(torch.tensor([[1.0], [0.25]]))
    shape = (1, 1, 1, 1)
    x = torch.full((4, *shape[1:]), 2.0 ** -4)                   # input integer 1 at scale 2^-4
    q = _force_po2(_prepared(net, x))
    quant = quantizers(q)
    quant["input"].log2_scale.fill_(-4)
    quant["fc"].log2_scale.fill_(9)                               # 2^20 · s_x · s_w = 2^20 · 2^-4 · 2^-7
    q.get_submodule("qlayers.fc").layer.bias.copy_(torch.tensor([33030016 * 2.0 ** -11, 0.0]))
    assert deployed_parts(q.get_submodule("qlayers.fc")).bias_int[0] == 33030016
    path = tmp_path / "wide.onnx"
    export_qdq(q, path, example_shape=shape)
    rep = check_bit_exact(q, path, x)
    fc = next(c for c in rep.layers if c.point == "fc")
    assert fc.max_abs_acc == 33030143 and fc.over_2_24 and fc.to_dict()["acc_over_2_24"]
    assert not next(c for c in rep.layers if c.point == "input").over_2_24
    assert fc.differ == 4 and fc.mismatches["pytorch/intref"] == 4 and fc.mismatches["ort_off/ort_on"] == 0
    assert not rep.passed and rep.first_difference is fc
    assert "accumulator reaches 33030143 > 2^24, where float32 runtimes are inexact" in rep.failures[0]


# -- verify of a power-of-two run -------------------------------------------------------------

def _flip_weight_bit(path, layer: str) -> None:
    def flip(name, a):
        if name != f"{layer}_w_q":
            return None
        a = a.copy()
        a.reshape(-1)[int(np.argmax(np.abs(a.reshape(-1)) < 100))] ^= 1   # stays inside the grid
        return a
    _save_changed(path, path, flip)


def test_verify_judges_a_po2_run_bit_exact(tmp_path):
    """An --act-bits run made power-of-two (the checkpoint rewritten as _force_po2 does, the manifest
    marked po2, hashes re-recorded): verify checks its int8 file bit-exact. tests/test_po2.py
    verifies a run trained with --scale-format po2."""
    out = tmp_path / "run"
    torch.manual_seed(0)
    r = cli("finetune", "resnet18", *TINY, "--limit-train", "16", "--limit-val", "16", "--epochs", "0",
            "--weight-bits", "8", "--act-bits", "8", "--no-deploy", "--out", out)  # exported once made po2
    assert r.exit_code == 0, r.output
    run = RunDir(out)
    manifest, qat = run.load_qat()
    run.save_model_state(_force_po2(qat))
    manifest.act = replace(manifest.act, scale_format="po2")
    run.finish(manifest)
    assert cli("export", out, "--precision", "int8").exit_code == 0
    r = cli("verify", out, "--precision", "int8", "--limit", "8")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "report.json").read_text())["verify"]["quantized"]["int8"]
    assert res["contract"] == "bit-exact" and res["passed"] and res["first_difference"] is None
    assert res["inputs"] == "8 images from synthetic:10" and res["images"] == 8
    assert [c["tensor"] for c in res["layers"]] == [f"{p.name}_q" for p in act_points(qat)] + ["logits"]
    assert all(c["integer_only"] and c["differ"] == 0 and c["elements"] > 0 for c in res["layers"])
    _flip_weight_bit(out / "model.int8.onnx", "layer2_0_conv1")
    run.record(run.manifest(), "model.int8.onnx")   # past the hash check: the contract must catch it
    r = cli("verify", out, "--precision", "int8", "--limit", "8")
    assert r.exit_code == 3, r.output
    res = json.loads((out / "report.json").read_text())["verify"]["quantized"]["int8"]
    first = res["first_difference"]
    assert first["tensor"] == "layer2_0_conv1_q" and first["differ"] > 0
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "int8: first difference at Conv 'layer2_0_conv1'" in line
    assert f": {first['differ']} of {first['elements']} elements differ" in line
