"""The library's front door (``import wnconvert``): light to import, QATConfig's record round
trip (its own dict and a run's manifest.json), a network of the user's own through the five calls
(examples/custom_resnet.py at a tiny size), and the float path. A run's network through the API
gives the run's own file byte for byte: tests/test_run_end.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import scale_first_dequantized_weight

import wnconvert
from wnconvert.convert.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]


def test_import_wnconvert_is_light_and_fast():
    code = ("import sys, time\nt = time.perf_counter()\nimport wnconvert\n"
            "v, c = wnconvert.__version__, wnconvert.QATConfig(weight_bits=4, act_bits=8)\n"
            "print(time.perf_counter() - t)\n"
            "print([m for m in ('torch', 'torchvision', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules])\n"
            "print(v)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    seconds, loaded, version = out.stdout.strip().splitlines()
    assert json.loads(loaded.replace("'", '"')) == []
    assert float(seconds) < 1.0  # 0.02 s on a quiet machine, 0.3-0.5 s at load 25-35 on 2 cores
    from importlib.metadata import version as dist_version
    assert version == dist_version("wnconvert")
    assert set(wnconvert.__all__) <= set(dir(wnconvert))


def test_qatconfig_round_trip_and_refusals():
    cfg = wnconvert.QATConfig(scheme="channel-max", weight_bits=4, act_bits=8, act_range="frozen",
                              scale_format="po2", exclude=["fc"], freeze_bn_epochs=2)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["version"] == 1 and wnconvert.QATConfig.from_dict(d) == cfg
    assert cfg.scheme_config().weight_bits == 4 and cfg.scheme_config().exclude == ("fc",)
    with pytest.raises(AttributeError):
        cfg.act_bits = 4  # frozen
    for bad in (dict(act_bits=1), dict(act_bits=9), dict(weight_bits=None), dict(scheme="weight-std"),
                dict(target="tpu"),
                dict(scale_format="po2", mixed_precision=True), dict(scale_format="po2", target="openvino"),
                dict(act_range="bogus")):
        with pytest.raises(UserInputError):
            wnconvert.QATConfig(**bad)
    with pytest.raises(UserInputError, match="newer"):
        wnconvert.QATConfig.from_dict(d | {"version": 2})
    with pytest.raises(UserInputError, match="unknown QATConfig field"):
        wnconvert.QATConfig.from_dict(d | {"bits": 8})
    assert wnconvert.QATConfig(act_bits=None).act_record() is None


def test_five_calls_on_a_custom_network(tmp_path):
    """examples/custom_resnet.py: prepare, calibrate, freeze_bn, export, verify, at 16 px; then a
    file whose first weight scale is changed fails the same verify."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import custom_resnet
    finally:
        sys.path.remove(str(ROOT / "examples"))
    result = custom_resnet.main(tmp_path, steps=4, image_size=16, batch=8, width=8)
    assert result["passed"], result["failures"]
    assert (result["precision"], result["contract"]) == ("int8", "lossless-activations")

    torch.manual_seed(0)
    model = custom_resnet.TinyResNet(width=8)
    q = wnconvert.prepare(model, wnconvert.QATConfig(weight_bits=8, act_bits=8))
    assert all(not hasattr(m, "parametrizations") for m in model.modules())  # the user's model untouched
    x = torch.randn(8, 3, 16, 16)
    assert len(wnconvert.calibrate(q, [(x, None)])) > 5
    path = tmp_path / "w8a8.onnx"
    assert wnconvert.export(q, path, example_input=x[:1]).contract == "lossless-activations"
    assert wnconvert.verify(q, path, inputs=x).passed
    # one road: convert.quantize's `trained` format writes what wnconvert.export (and export RUN) write
    from wnconvert.convert.quantize import FORMATS, QuantOptions, TrainedNetwork, quantize, trained
    assert trained in FORMATS
    again = tmp_path / "again" / "w8a8.onnx"
    quantize(TrainedNetwork(q, (1, 3, 16, 16)), again, QuantOptions(act_bits=None, scales="trained"))
    assert again.read_bytes() == path.read_bytes() and [p.name for p in again.parent.iterdir()] == ["w8a8.onnx"]
    with pytest.raises(UserInputError, match="its own"):
        QuantOptions(scales="trained")  # act_bits 8 is the calibrated files' option
    scale_first_dequantized_weight(path, 1.5)
    bad = wnconvert.verify(q, path, inputs=x)
    assert not bad.passed and bad.failures and bad.to_dict()["passed"] is False
    with pytest.raises(UserInputError, match="already has parametrized"):
        wnconvert.prepare(q, wnconvert.QATConfig())
    with pytest.raises(UserInputError, match="act_bits"):
        wnconvert.calibrate(wnconvert.prepare(model, wnconvert.QATConfig(act_bits=None)), [x])


def test_float_path_exports_fp32_in_unit_range(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import custom_resnet
    finally:
        sys.path.remove(str(ROOT / "examples"))
    torch.manual_seed(0)
    r = wnconvert.prepare(custom_resnet.TinyResNet(width=8), wnconvert.QATConfig(act_bits=None, weight_bits=None))
    x = torch.randn(4, 3, 16, 16)
    folded = wnconvert.fold(r, x)
    assert folded.max_stored <= 1.0
    exp = wnconvert.export(r, tmp_path / "m.onnx", example_input=x[:1])
    assert (exp.precision, exp.contract) == ("fp32", "fp32-parity")
    rep = wnconvert.verify(r, tmp_path / "m.onnx", inputs=x)
    assert rep.passed, rep.failures
