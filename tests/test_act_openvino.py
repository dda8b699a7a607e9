"""`finetune --act-bits --target openvino`: the integer network trained with OpenVINO's placement
(a conv read only by a residual add stays float: OpenVINO fuses the add into it and skips that
requantization, convert/quantize/placement.py), so that OpenVINO, not only onnxruntime, computes
the trained network.

Measured on the networks below (untrained, 2 calibration/training steps, 64 random images): with
the ort-cpu placement OpenVINO's logits equal onnxruntime's in 45 % (ResNet-18) and 93 %
(MobileNetV2) of the elements, with OpenVINO's placement in 98 % and 100 %, the rest one step
apart. On a ResNet-18 trained one epoch on 512 Fashion-MNIST images top-1 agreement went from 0.974
to 0.999 (1000 test images).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from helpers import cli
from test_actquant import SHAPE, _images, _model, _train

from wnconvert.convert.actquant import (
    ActQuantConfig,
    act_points,
    calibrate,
    check_lossless_activations,
    export_qdq,
    freeze_bn,
    prepare_qat,
)
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.openvino_rt import run_runtime
from wnconvert.models.train.act_run import ActSettings

# ResNet-18: each block's second conv, except in the three downsample blocks, where the add is
# fused into the downsample conv (the later of the two in the graph).
RESNET18_FLOAT = {"layer1_0_conv2", "layer1_1_conv2", "layer2_0_downsample_0", "layer2_1_conv2",
                  "layer3_0_downsample_0", "layer3_1_conv2", "layer4_0_downsample_0", "layer4_1_conv2"}


def _trained(name: str, placement: str):
    q = prepare_qat(_model(name), ActQuantConfig(8, residual_conv=placement))
    calibrate(q, [_images(8, seed=2)])
    _train(q, 1)
    freeze_bn(q)
    _train(q, 1, seed=3)
    return q.eval()


def _float_convs(path) -> set[str]:
    model = onnx.load(str(path))
    convs = {n.output[0]: n.name for n in model.graph.node if n.op_type == "Conv"}
    return {convs[i] for n in model.graph.node if n.op_type == "Add" for i in n.input if i in convs}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = {}
    for name in ("resnet18", "mobilenet_v2"):
        for placement in ("quantized", "float"):
            q = _trained(name, placement)
            path = tmp_path_factory.mktemp("aov") / f"{name}_{placement}.onnx"
            out[name, placement] = q, path, export_qdq(q, path, example_shape=SHAPE)
    return out


@pytest.mark.parametrize("name, n_float", [("resnet18", 8), ("mobilenet_v2", 10)])
def test_points_and_file_follow_the_placement(files, name, n_float):
    q, path, info = files[name, "float"]
    points = [p.name for p in act_points(q)]
    assert points == info.points  # one description: fake-quant points are the file's Q/DQ points
    assert len(_float_convs(path)) == n_float and _float_convs(files[name, "quantized"][1]) == set()
    assert len(points) == len(act_points(files[name, "quantized"][0])) - n_float
    if name == "resnet18":
        assert _float_convs(path) == RESNET18_FLOAT
    result = check_lossless_activations(q, path, _images(16))
    assert result["passed"], result["failures"]


def test_openvino_computes_the_trained_network(files):
    x = _images(64).numpy()
    same = {}
    for key, (_, path, _) in files.items():
        same[key] = float(np.mean(run_runtime("onnxruntime", path, x) == run_runtime("openvino", path, x)))
    assert same["resnet18", "float"] >= 0.95 and same["resnet18", "quantized"] <= 0.8, same
    assert same["mobilenet_v2", "float"] >= 0.99, same


def test_settings_refused_and_kept():
    with pytest.raises(UserInputError, match="--target openvino keeps"):
        ActQuantConfig(8, scale_format="po2", residual_conv="float")
    with pytest.raises(UserInputError, match="residual_conv must be one of"):
        ActQuantConfig(8, residual_conv="fused")
    settings = ActSettings(8, residual_conv="float")
    assert ActSettings.from_dict(settings.to_dict()) == settings
    assert ActSettings.from_dict({"bits": 8}).residual_conv == "quantized"  # runs made before the option


TINY = ["resnet18", "--weights", "none", "--image-size", "32", "--num-classes", "10", "--data", "synthetic:10",
        "--workers", "0", "--device", "cpu", "--batch-size", "16", "--samples", "2", "--limit-train", "16",
        "--limit-val", "16", "--epochs", "1"]


@pytest.mark.parametrize("extra, message", [
    (["--target", "openvino"], "apply to --act-bits runs only"),
    (["--weight-bits", "8", "--act-bits", "8", "--target", "openvino", "--scale-format", "po2"], "choose one"),
    (["--weight-bits", "8", "--act-bits", "8", "--target", "tensorrt"], "tensorrt"),
])
def test_refused_before_anything_is_written(tmp_path, extra, message):
    r = cli("finetune", *TINY, *extra, "--out", tmp_path / "run", code=2)
    assert message in r.output and not (tmp_path / "run").exists()


def test_run_trained_for_openvino(tmp_path):
    torch.manual_seed(0)
    run = tmp_path / "run"
    cli("finetune", *TINY, "--weight-bits", "8", "--act-bits", "8", "--target", "openvino", "--out", run)
    assert json.loads((run / "manifest.json").read_text())["act"]["residual_conv"] == "float"
    report = json.loads((run / "report.json").read_text())  # finetune wrote model.int8.onnx for openvino
    assert report["deployed"]["target"] == "openvino" and report["deployed"]["passed"]
    assert report["quantized"]["int8"]["residual_conv"] == "float"
    assert "note" not in report["targets"]["model.int8.onnx"]  # the file is the target's own placement
    assert _float_convs(run / "model.int8.onnx") == RESNET18_FLOAT
    cli("verify", run, "--precision", "int8", "--limit", "8")  # lossless-activations, in onnxruntime
    cli("export", run, "--precision", "int8", "--target", "ort-cpu")  # the same file, noted
    note = json.loads((run / "report.json").read_text())["targets"]["model.int8.onnx"]["note"]
    assert "trained for OpenVINO's placement" in note
    r = cli("golden", run, "--out", tmp_path / "golden", code=2)
    assert "finetune --target openvino" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "golden").exists()
