"""The graph rewrite benchmarks/hls4ml_qonnx.py makes before hls4ml sees a QONNX file: a padded max
pooling whose input is provably non-negative becomes Pad(constant 0) + MaxPool without padding
(hls4ml's streaming pooling takes no padding). Checked with qonnx's real executor on the cleaned,
channels-last graph hls4ml is given; a pooling whose input may be negative is left alone."""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

pytest.importorskip("qonnx")

from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.core.onnx_exec import execute_onnx  # noqa: E402
from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean  # noqa: E402
from qonnx.util.cleanup import cleanup_model  # noqa: E402

from wnconvert.convert.actquant import ActQuantConfig, calibrate, prepare_qat  # noqa: E402
from wnconvert.convert.actquant.export_qonnx import export_qonnx  # noqa: E402
from wnconvert.convert.apply import apply_scheme  # noqa: E402
from wnconvert.convert.schemes import SchemeConfig  # noqa: E402

_spec = importlib.util.spec_from_file_location("hls4ml_qonnx", Path(__file__).parents[1] / "benchmarks" /
                                               "hls4ml_qonnx.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


class Stem(nn.Module):
    """A ResNet-like stem: conv/BN/ReLU, 3x3 max pooling of stride 2 padded by 1 (non-negative input);
    then a conv without ReLU and the same pooling (input of either sign); linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool1 = nn.MaxPool2d(3, 2, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool2 = nn.MaxPool2d(3, 2, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        y = self.pool1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool2(self.conv2(y)), 1))


def _cleaned(tmp_path) -> onnx.ModelProto:
    torch.manual_seed(0)
    m = Stem().eval()
    apply_scheme(m, SchemeConfig("channel-max", weight_bits=4))
    q = prepare_qat(m, ActQuantConfig(4, scale_format="po2"))
    calibrate(q, [torch.randn(16, 3, 11, 11)])
    q.eval()
    export_qonnx(q, tmp_path / "m.qonnx.onnx", example_shape=(1, 3, 11, 11))
    mw = cleanup_model(ModelWrapper(onnx.load(str(tmp_path / "m.qonnx.onnx"))))
    return cleanup_model(mw.transform(ConvertToChannelsLastAndClean())).model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    mw = ModelWrapper(model)
    return np.stack([execute_onnx(mw, {mw.graph.input[0].name: x[i:i + 1]})[mw.graph.output[0].name]
                     for i in range(len(x))])


def test_zero_pad_rewrite_keeps_the_function_and_only_where_proven(tmp_path):
    before = _cleaned(tmp_path)
    after = onnx.ModelProto.FromString(before.SerializeToString())
    notes = bench.pad_pools(after)
    pools = [n for n in after.graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 2
    pads = {n.name: list(next(a for a in n.attribute if a.name == "pads").ints) for n in pools}
    first, second = (n.name for n in pools)
    assert pads == {first: [0, 0, 0, 0], second: [1, 1, 1, 1]}, pads
    assert len(notes) == 2 and "unsigned Quant, zero point 0" in notes[0] and "left as it is" in notes[1], notes
    pad = next(n for n in after.graph.node if n.op_type == "Pad")
    assert pad.output[0] == pools[0].input[0]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in after.graph.initializer}
    assert inits[pad.input[1]].tolist() == [0, 1, 1, 0, 0, 1, 1, 0] and inits[pad.input[2]] == 0  # NHWC pads
    x = np.random.default_rng(0).normal(0, 1.5, (6, 3, 11, 11)).astype(np.float32)
    assert np.array_equal(_run(before, x), _run(after, x))
    # what the proof guards: zero padding where the input can be negative changes the outputs
    forced = onnx.ModelProto.FromString(before.SerializeToString())
    producer = next(n for n in forced.graph.node if pools[1].input[0] in n.output)
    next(a for a in producer.attribute if a.name == "signed").i = 0  # pretend it is unsigned...
    assert len(bench.pad_pools(forced)) == 2 and sum(n.op_type == "Pad" for n in forced.graph.node) == 2
    next(a for n in forced.graph.node if n.name == producer.name for a in n.attribute if a.name == "signed").i = 1
    assert not np.array_equal(_run(before, x), _run(forced, x))  # ...and the signed values differ
