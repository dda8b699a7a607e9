"""Fold and export across a spread of architectures: exact, unit-range, BN handled as asked."""

import copy

import numpy as np
import onnx
import pytest
import torch
from helpers import SPREAD, SharedOutput, randomize
from torch import nn
from torch.nn.utils import parametrize

from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.errors import RangeError
from wnconvert.convert.export import ExportConfig, export_onnx
from wnconvert.convert.fold import FoldConfig, fold_model
from wnconvert.convert.onnx_ranges import check_unit_range, weight_ranges
from wnconvert.convert.pipeline import convert
from wnconvert.convert.runtime import run_onnx
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.convert.verify import VerifyConfig

SCHEMES = ["layer-max", "channel-max", "weight-std", "weight-norm", "none"]


def _model(name, scheme, seed=0):
    factory, size = SPREAD[name]
    torch.manual_seed(seed)
    model = randomize(factory(), seed)
    original = copy.deepcopy(model)
    apply_scheme(model, SchemeConfig(scheme))
    return original, model, size


@pytest.mark.parametrize("bn", ["keep", "fold"])
@pytest.mark.parametrize("name", sorted(SPREAD))
def test_convert_matches_original_in_onnxruntime(name, bn, tmp_path):
    scheme = SCHEMES[sorted(SPREAD).index(name) % len(SCHEMES)]  # spread the schemes over the models
    original, model, size = _model(name, scheme)
    result = convert(model, (3, size, size), tmp_path / "model.onnx", fold_config=FoldConfig(bn=bn),
                     original=original, verify_config=VerifyConfig(samples=6))
    assert result.parity.passed, result.parity.failures()
    assert result.parity_vs_original.passed, result.parity_vs_original.failures()
    ranges = weight_ranges(onnx.load(str(result.onnx_path)))
    assert ranges and all(r.max_abs <= 1.0 and r.via != "computed in graph" for r in ranges)
    assert max(r.max_abs for r in ranges) == 1.0
    onnx_bns = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(result.onnx_path)).graph.node)

    def count_bn(m):
        return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())

    # keep: the exporter did not fold any BatchNorm back into a weight; fold: only the BatchNorms
    # that do not follow a layer (pre-activation, shared outputs) remain.
    assert onnx_bns == count_bn(result.fold.model)
    if bn == "keep":
        assert onnx_bns == count_bn(original)
    elif name in ("resnet18", "mobilenet_v3_small", "resnext_grouped", "transposed"):
        assert onnx_bns == 0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_on_resnet(scheme, tmp_path):
    original, model, size = _model("resnet18", scheme, seed=3)
    for bn in ("keep", "fold"):
        result = convert(model, (3, size, size), tmp_path / bn / "model.onnx",
                         fold_config=FoldConfig(bn, "channel"), original=original)
        assert result.parity.passed and result.parity_vs_original.passed


def test_fold_leaves_the_source_model_intact():
    """deepcopy shares the parametrized class; the fold must not break the original."""
    _, model, size = _model("resnet18", "layer-max")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = model(x)
    folded = fold_model(model, x).model
    assert not any(parametrize.is_parametrized(m) for m in folded.modules())
    assert parametrize.is_parametrized(model.conv1, "weight")
    with torch.no_grad():
        assert torch.equal(model(x), before)
        assert torch.allclose(folded(x), before, atol=1e-5 * float(before.abs().max()))


def test_scale_is_not_moved_into_a_bn_that_is_not_the_sole_consumer():
    model = randomize(SharedOutput())
    apply_scheme(model, SchemeConfig("channel-max"))
    x = torch.randn(2, 3, 8, 8)
    result = fold_model(model, x, FoldConfig("fold"))
    where = {c.layer: c.scale for c in result.layers}
    assert where["conv.weight"] == "output Mul"
    assert isinstance(result.model.bn, nn.BatchNorm2d)  # not folded away
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-5)


def test_certificate_records_each_layer():
    _, model, size = _model("resnet18", "layer-max")
    result = fold_model(model, torch.randn(2, 3, size, size))
    cert = {c["layer"]: c for c in result.certificate()}
    assert len(cert) == 21
    assert cert["conv1.weight"]["scale"] == "absorbed into bn1"
    assert cert["fc.weight"]["scale"] == "output Mul"
    assert all(c["stored_max_abs"] <= 1.0 and c["rel_diff"] < 1e-5 for c in cert.values())


def test_dynamic_batch_and_optimization_levels(tmp_path):
    _, model, size = _model("mobilenet_v3_small", "channel-max")
    result = convert(model, (3, size, size), tmp_path / "model.onnx")
    x = torch.randn(5, 3, size, size)
    with torch.no_grad():
        ref = model(x).numpy()
    for opt in (False, True):
        out = run_onnx(result.onnx_path, x.numpy(), optimized=opt)
        assert out.shape == (5, 10)
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_range_check_catches_an_unfolded_export(tmp_path):
    original, _, size = _model("resnet18", "none")
    path = export_onnx(original, torch.randn(1, 3, size, size), tmp_path / "raw.onnx")
    ranges = weight_ranges(onnx.load(str(path)))
    if all(r.max_abs <= 1 for r in ranges):  # make it out of range for sure
        with torch.no_grad():
            original.fc.weight.mul_(50)
        path = export_onnx(original, torch.randn(1, 3, size, size), tmp_path / "raw.onnx")
        ranges = weight_ranges(onnx.load(str(path)))
    with pytest.raises(RangeError, match="outside"):
        check_unit_range(ranges, "raw.onnx")


def test_range_check_flags_weights_computed_in_graph(tmp_path):
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.rand(4, 3) * 0.5)
            self.s = nn.Parameter(torch.rand(4, 3) + 2)

        def forward(self, x):
            return x @ (self.w + self.s).t()

    path = export_onnx(Computed(), torch.randn(2, 3), tmp_path / "c.onnx",
                       ExportConfig(constant_folding=False))
    ranges = weight_ranges(onnx.load(str(path)))
    assert [r.via for r in ranges] == ["computed in graph"]
    with pytest.raises(RangeError):
        check_unit_range(ranges, "c.onnx")


def test_export_is_atomic_on_failure(tmp_path):
    class Bad(nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x.reshape(-1, 2, 2))[0].real  # no ONNX symbolic

    from wnconvert.convert.export import ExportError
    with pytest.raises(ExportError, match="ONNX export failed"):
        export_onnx(Bad(), torch.randn(1, 4), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("in_hw,out_hw", [((1, 1), (6, 6)), ((2, 3), (7, 7)), ((13, 13), (6, 6)), ((5, 9), (3, 4))])
def test_fixed_adaptive_pool_is_exact(in_hw, out_hw):
    from wnconvert.convert.export_compat import FixedAdaptiveAvgPool2d
    x = torch.randn(2, 3, *in_hw)
    ref = nn.functional.adaptive_avg_pool2d(x, out_hw)
    assert torch.allclose(FixedAdaptiveAvgPool2d(in_hw, out_hw)(x), ref, atol=1e-6)


def test_small_images_through_a_vgg_style_pool_export(tmp_path):
    """AlexNet/VGG pool to 6x6/7x7: at small sizes the exporter rejects the op unless replaced."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(), nn.Linear(8 * 49, 10)))
    original = copy.deepcopy(model)
    apply_scheme(model, SchemeConfig("layer-max"))
    result = convert(model, (3, 16, 16), tmp_path / "model.onnx", original=original)
    assert result.parity.passed and result.parity_vs_original.passed


def test_a_layer_applied_to_a_constant_table_checks_only_its_weight(tmp_path):
    """Swin V2 runs an MLP over a constant coordinate table: the table is data, not a weight."""

    class TableMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.linspace(-8, 8, 12).reshape(6, 2))
            self.mlp = nn.Linear(2, 3)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            bias = self.mlp(self.table).sum(0)
            return self.head(x) + bias

    model = TableMLP().eval()
    apply_scheme(model, SchemeConfig("layer-max"))
    folded = fold_model(model, torch.randn(2, 4)).model
    path = export_onnx(folded, torch.randn(2, 4), tmp_path / "t.onnx", ExportConfig(constant_folding=False))
    ranges = weight_ranges(onnx.load(str(path)))
    assert {r.initializer for r in ranges} >= {"mlp.weight", "head.weight"}
    assert "table" not in {r.initializer for r in ranges}
    check_unit_range(ranges, "t.onnx")
