"""Activation quantization-aware training: graph capture, LSQ training, lossless QDQ export."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from wnconvert.convert.actquant import (
    ActQuantConfig,
    ActQuantizer,
    act_points,
    activation_diagnostics,
    calibrate,
    check_lossless_activations,
    deployed_parts,
    export_qdq,
    freeze_bn,
    prepare_qat,
    qlayers,
    quantizers,
)
from wnconvert.convert.apply import apply_scheme, reparam_of
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.models.zoo.zoo import build_model

SHAPE = (1, 3, 32, 32)


def _model(name: str, weight_bits: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    m = build_model(name, "none", 10).model
    apply_scheme(m, SchemeConfig("channel-max", weight_bits=weight_bits))
    return m


def _train(q, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    q.train()
    for _ in range(steps):
        x = torch.randn(8, *SHAPE[1:], generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(q(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _trained(name: str, act_bits: int = 8, weight_bits: int = 8, frozen_steps: int = 0):
    """Calibrated, one step with live BatchNorm, then BatchNorm frozen (and ``frozen_steps``)."""
    q = prepare_qat(_model(name, weight_bits), ActQuantConfig(act_bits))
    calibrate(q, [_images(8, seed=2)])
    q.snapshot = ({n: s.scale_value() for n, s in quantizers(q).items()},
                  {n: p.detach().clone() for n, p in q.named_parameters() if "original" in n})
    _train(q, 1)
    freeze_bn(q)
    _train(q, frozen_steps, seed=3)
    return q.eval()


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    q = _trained("resnet18", frozen_steps=1)
    path = tmp_path_factory.mktemp("aq") / "resnet18_w8a8.onnx"
    info = export_qdq(q, path, example_shape=SHAPE)
    return q, path, info


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    q = _trained("mobilenet_v2")
    path = tmp_path_factory.mktemp("aq") / "mobilenet_v2_w8a8.onnx"
    info = export_qdq(q, path, example_shape=SHAPE)
    return q, path, info


def _images(n: int = 16, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, *SHAPE[1:], generator=torch.Generator().manual_seed(seed))


def _tagged(path, op: str) -> list[str]:
    """Point tags of the activation Q (or DQ) nodes: their doc_string."""
    return [n.doc_string for n in onnx.load(str(path)).graph.node if n.op_type == op and n.doc_string]


# -- the quantizer ------------------------------------------------------------------------------

def test_quantizer_forward_is_quantize_dequantize_and_gradients_are_lsq():
    q = ActQuantizer(4, signed=True)
    with torch.no_grad():
        q.log2_scale.fill_(-2.0)                      # s = 0.25, grid -8..7
    x = torch.tensor([[-3.0, -0.375, 0.125, 0.3, 1.74, 5.0]], requires_grad=True)  # one sample of 6
    y = q(x)[0]
    expect = torch.clamp(torch.round(x.detach() / 0.25), -8, 7) * 0.25   # 0.125/0.25 = 0.5 -> 0 (even)
    assert torch.equal(y.detach(), expect[0])
    assert float(y[2].detach()) == 0.0 and float(y[1].detach()) == -0.5  # -1.5 -> -2 (half to even)
    y.sum().backward()
    assert x.grad[0].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # straight through inside only
    v = x.detach() / 0.25
    k = torch.clamp(torch.round(v), -8, 7)
    lsq = torch.where((v >= -8) & (v <= 7), k - v, k).sum() / (6 * 7) ** 0.5
    assert q.log2_scale.grad is not None
    assert float(q.log2_scale.grad) == pytest.approx(float(lsq) * 0.25 * np.log(2), rel=1e-5)
    d = q.diagnose(x.detach())
    assert d["clipped"] == pytest.approx(2 / 6) and d["scale"] == 0.25 and d["sqnr_db"] > 0


def test_config_rejects_bad_bits_and_range():
    with pytest.raises(UserInputError, match="--act-bits must be an integer from 2 to 8"):
        ActQuantConfig(1)
    with pytest.raises(UserInputError, match="--act-bits"):
        ActQuantConfig(9)
    assert ActQuantConfig(2).bits == 2 and ActQuantConfig(3).bits == 3
    with pytest.raises(UserInputError, match="--act-range"):
        ActQuantConfig(8, "minmax")


# -- graph capture ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_fake_quant_points_equal_qdq_points(name, request):
    q, path, info = request.getfixturevalue("resnet" if name == "resnet18" else "mobilenet")
    points = [p.name for p in act_points(q)]
    assert len(points) == len(set(points)) == len(list(q.modules()) and quantizers(q))
    assert sorted(_tagged(path, "QuantizeLinear")) == sorted(points) == sorted(info.points)
    assert sorted(_tagged(path, "DequantizeLinear")) == sorted(points)
    kinds = {p.kind for p in act_points(q)}
    assert kinds == {"input", "layer", "add", "pool"}
    assert len([p for p in act_points(q) if p.kind == "layer"]) == len(qlayers(q))
    after_relu = [p for p in act_points(q) if p.kind == "layer" and qlayers_by_point(q)[p.name].act]
    assert after_relu and all(not p.signed for p in after_relu)
    assert next(p for p in act_points(q) if p.kind == "input").signed


def qlayers_by_point(q):
    return {n.target.split(".", 1)[1]: q.get_submodule(n.target) for n in q.graph.nodes
            if n.op == "call_module" and n.target.startswith("qlayers.")}


def test_unsupported_op_is_refused_with_its_name():
    with pytest.raises(UserInputError, match=r"Hardswish \(node '.*'\) has no integer form"):
        prepare_qat(_model("mobilenet_v3_small"), ActQuantConfig(8))


def test_layers_without_weight_grid_are_refused():
    m = build_model("resnet18", "none", 10).model
    apply_scheme(m, SchemeConfig("channel-max"))
    with pytest.raises(UserInputError, match="fixed grid"):
        prepare_qat(m, ActQuantConfig(8))


# -- training -----------------------------------------------------------------------------------

def test_training_steps_move_scales_and_weights(resnet):
    q = resnet[0]
    scales, weights = q.snapshot
    assert all(s.calibrated for s in quantizers(q).values())
    moved = [n for n, s in quantizers(q).items() if s.scale_value() != scales[n]]
    assert len(moved) >= 0.9 * len(scales), moved           # the LSQ gradient reaches the scales
    # (a point of this random network can get an exactly zero scale gradient in two steps)
    changed = [n for n, p in q.named_parameters() if "original" in n and not torch.equal(p, weights[n])]
    assert sorted(changed) == sorted(weights)               # and every weight through the STE


def test_frozen_range_has_no_scale_parameter():
    q = ActQuantizer(8, signed=False, learned=False)
    assert not list(q.parameters()) and "log2_scale" in dict(q.named_buffers())


# -- export and the lossless contract -----------------------------------------------------------

def test_exported_weights_are_the_trained_integers(resnet):
    q, path, _ = resnet
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    for name, layer in qlayers_by_point(q).items():
        p = reparam_of(layer.layer, "weight")
        trained = torch.round(p.unit_parts(layer.layer.parametrizations.weight.original)[0] * 127)
        stored = inits[f"{name}_w_q"].astype(np.int64)
        assert inits[f"{name}_w_q"].dtype == np.int8
        assert np.array_equal(np.abs(stored), np.abs(trained.numpy().astype(np.int64))), name
        d = deployed_parts(layer)
        assert np.array_equal(inits[f"{name}_b_q"], d.bias_int.astype(np.int32))
        assert np.array_equal(inits[f"{name}_b_scale"], d.bias_scale)


def test_eval_layer_is_the_trained_layer_with_batchnorm_folded(resnet):
    """Eval (deployed: BN in the per-channel weight scale, int32 bias) equals training mode with
    frozen BatchNorm up to the int32 bias rounding, half a bias step per channel."""
    q = resnet[0]
    g = torch.Generator().manual_seed(7)
    layers = qlayers_by_point(q)
    for name in ["conv1", "layer1_0_conv2", "layer2_0_downsample_0", "layer4_1_conv1", "fc"]:
        layer = copy.deepcopy(layers[name])
        layer.set_input_quantizer(layers[name]._input_quant)
        if layer.bn is not None:   # negative and zero BatchNorm factors: sign into k, dead channel
            with torch.no_grad():
                layer.bn.weight[::3] *= -1
                layer.bn.weight[1] = 0
        shape = (4, layer.layer.in_channels, 8, 8) if layer.is_conv else (4, layer.layer.in_features)
        s_x = layer._input_quant.scale()
        x = torch.round(torch.rand(shape, generator=g) * 100) * s_x   # on the input grid
        try:
            layer.train()
            with torch.no_grad():
                trained = layer(x)
        finally:
            layer.eval()
        with torch.no_grad():
            deployed = layer(x)
        d = deployed_parts(layer)
        bound = torch.from_numpy(d.bias_scale).reshape((-1,) + (1,) * (trained.dim() - 2)) * 0.5
        err = (deployed - trained).abs()
        assert float(err.max()) > 0, name                  # the bias really is rounded
        assert torch.all(err <= bound + 1e-5 * trained.abs().max()), name


def test_lossless_check_passes_off_and_on_and_fails_on_one_percent(resnet, tmp_path):
    q, path, _ = resnet
    x = _images(8)
    res = check_lossless_activations(q, path, x)
    assert res["passed"], res["failures"]
    for level in ("off", "on"):
        stats = res["levels"][level]["points"]
        assert set(stats) == {p.name for p in act_points(q)}
        assert all(s["off_ties"] == 0 and s["max_steps"] <= 1 for s in stats.values())
    model = onnx.load(str(path))
    victim = act_points(q)[len(act_points(q)) // 2].name
    init = next(i for i in model.graph.initializer if i.name == f"{victim}_scale")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.01), init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    res = check_lossless_activations(q, bad, x)
    assert not res["passed"]
    assert any(f"point {victim}:" in f for f in res["failures"])
    assert all(victim in f or "top-1" in f for f in res["failures"])  # local: no spread downstream


def test_onnxruntime_fuses_integer_kernels(resnet, tmp_path):
    _, path, _ = resnet
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 20 and "Conv" not in ops
    assert ops.count("QLinearAdd") == 8 and "Add" not in ops


def test_mobilenet_v2_relu6_points_are_unsigned_and_lossless(mobilenet):
    q, path, _ = mobilenet
    relu6 = [p for p, layer in qlayers_by_point(q).items() if layer.act == "relu6"]
    qs = quantizers(q)
    assert relu6 and all(not qs[p].signed and qs[p].scale_value() * 255 <= 6.0 for p in relu6)
    res = check_lossless_activations(q, path, _images(8))
    assert res["passed"], res["failures"]


def test_w4a4_exports_4bit_types_at_opset_21_and_is_lossless(tmp_path):
    q = _trained("resnet18", act_bits=4, weight_bits=4)
    path = tmp_path / "w4a4.onnx"
    info = export_qdq(q, path, example_shape=SHAPE)
    assert info.opset == 21
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    types = {n.doc_string: TensorProto.DataType.Name(inits[n.input[2]].data_type) for n in model.graph.node
             if n.op_type == "QuantizeLinear"}
    # points feeding max pooling / flatten are stored in 8 bits, an integer Clip to the 4-bit range
    # after their QuantizeLinear
    assert sorted(info.clipped_points) == ["avgpool", "conv1"]
    assert {types[p] for p in info.clipped_points} == {"UINT8"}
    assert {t for p, t in types.items() if p not in info.clipped_points} == {"UINT4", "INT4"}
    clips = {n.output[0].removesuffix("_q") for n in model.graph.node if n.op_type == "Clip"
             and n.input[0].endswith("_q8")}
    assert clips == set(info.clipped_points)
    assert {inits[f"{n}_w_q"].data_type for n in qlayers_by_point(q)} == {TensorProto.INT4}
    res = check_lossless_activations(q, path, _images(8))
    assert res["passed"], res["failures"]


def test_state_dict_round_trip_rebuilds_the_same_network(resnet, tmp_path):
    """Resume: prepare the same model again, load the state: same points, scales, frozen
    BatchNorm, outputs and exported file."""
    q, path, _ = resnet
    again = prepare_qat(_model("resnet18"), ActQuantConfig(8))
    again.load_state_dict(q.state_dict())
    again.eval()
    twin = copy.deepcopy(q)
    assert act_points(again) == act_points(q) == act_points(twin)
    assert all(bool(layer.bn_frozen) for layer in qlayers(again) if layer.bn is not None)
    x = _images(4)
    with torch.no_grad():
        assert torch.equal(again(x), q(x)) and torch.equal(twin(x), q(x))
    assert twin.get_submodule("qlayers.fc")._input_quant is twin.get_submodule("act_quant.avgpool")
    export_qdq(again, tmp_path / "again.onnx", example_shape=SHAPE)
    assert (tmp_path / "again.onnx").read_bytes() == path.read_bytes()


def test_activation_diagnostics_per_point(resnet):
    q = resnet[0]
    d = activation_diagnostics(q, _images(4))
    assert list(d) == [p.name for p in act_points(q)]
    assert all(v["scale"] == quantizers(q)[k].scale_value() for k, v in d.items())
    assert all(0.0 <= v["clipped"] < 0.5 and v["sqnr_db"] > 10 for v in d.values())


class _CatNet(torch.nn.Module):
    """Concatenation of a signed and an unsigned branch, AvgPool2d, functional ReLU, dropout."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.conv3, self.bn3 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.avg, self.drop, self.fc = nn.AvgPool2d(2), nn.Dropout(0.1), nn.Linear(10 * 8 * 8, 10)

    def forward(self, x):
        p = self.pool(torch.nn.functional.relu(self.bn1(self.conv1(x))))
        m = torch.cat([self.conv2(p), torch.relu(self.bn3(self.conv3(p)))], dim=1)
        return self.fc(self.drop(torch.flatten(self.avg(m), 1)))


@pytest.mark.parametrize("bits,storage", [(6, "int8"), (8, "int8"), (5, "offset")])
def test_concat_and_narrow_activations_are_lossless(bits, storage, tmp_path):
    torch.manual_seed(0)
    m = _CatNet()
    apply_scheme(m, SchemeConfig("layer-max", weight_bits=6))
    q = prepare_qat(m, ActQuantConfig(bits))
    assert [(p.name, p.kind, p.signed) for p in act_points(q)] == [
        ("input", "input", True), ("conv1", "layer", False), ("conv2", "layer", True),
        ("conv3", "layer", False), ("cat", "cat", True), ("avg", "pool", True), ("fc", "layer", True)]
    calibrate(q, [_images(8)])
    _train(q, 1)
    freeze_bn(q)
    path = tmp_path / "cat.onnx"
    info = export_qdq(q.eval(), path, example_shape=SHAPE, signed_storage=storage)
    assert sorted(info.clipped_points) == (sorted(info.points) if bits < 8 else [])
    signed_type = {"int8": "INT8", "offset": "UINT8+128"}[storage]
    assert {info.activation_types[p.name] for p in act_points(q) if p.signed} == {signed_type}
    res = check_lossless_activations(q, path, _images(8))
    assert res["passed"], res["failures"]
