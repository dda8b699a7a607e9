"""Deployment targets: each preset's structural rules on hand-built graphs and on real exports of a
trained run, overrides recorded, targets a run cannot take refused in one line, and int8 calibrated
from the run's own data when --data is not given."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from helpers import cli
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.quantize import ArrayReader, QuantOptions, quantize
from wnconvert.convert.quantize.target_rules import fixed_point_violations, tensorrt_violations
from wnconvert.convert.quantize.targets import get_target
from wnconvert.models.run.run_target import check_run_target
from wnconvert.models.run.rundir import RunDir


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def qdq_conv(*, act_zp=np.int8(0), w_axis=0, w_scale=None, w=None, opset=13, bias_int32=False,
             act_scale=np.float32(0.05), q_zero_point=True):
    """input -> Q -> DQ -> Conv(DQ(int8 weight), bias) -> Relu: TensorRT-conforming by default."""
    w = np.array([[[[1, -2], [3, 127]]], [[[-127, 0], [5, 6]]]], np.int8) if w is None else w
    w_scale = np.array([0.01, 0.02], np.float32) if w_scale is None else w_scale
    inits = [_init("act_s", act_scale), _init("act_zp", act_zp), _init("w_q", w), _init("w_s", w_scale),
             _init("w_zp", np.zeros(w_scale.shape, np.int8))]
    act = ["act_s", "act_zp"] if q_zero_point else ["act_s"]
    axis = {} if w_axis is None else {"axis": w_axis}
    nodes = [helper.make_node("QuantizeLinear", ["input", *act], ["input_q"], name="q_in"),
             helper.make_node("DequantizeLinear", ["input_q", *act], ["input_dq"], name="dq_in"),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="dq_w", **axis)]
    if bias_int32:
        inits += [_init("b_q", np.array([3, -4], np.int32)), _init("b_s", np.float32(5e-4))]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["b"], name="dq_b"))
    else:
        inits.append(_init("b", np.array([0.1, -0.2], np.float32)))
    nodes += [helper.make_node("Conv", ["input_dq", "w", "b"], ["conv"], name="conv"),
              helper.make_node("Relu", ["conv"], ["output"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def test_conforming_graph_has_no_violations():
    assert tensorrt_violations(qdq_conv()) == []


@pytest.mark.parametrize("kwargs, expected", [
    (dict(act_zp=np.int8(3)), ["zero point [3] is not 0"]),
    (dict(act_zp=np.uint8(0)), ["zero point is uint8", "uint8 tensor"]),
    (dict(q_zero_point=False), ["uint8 tensor"]),
    (dict(w_axis=None), ["not quantized per output channel"]),
    (dict(w_axis=1, w_scale=np.array([0.01], np.float32)), ["not quantized per output channel"]),
    (dict(w_scale=np.float32(0.01), w_axis=None), ["not quantized per output channel"]),
    (dict(opset=12, w_axis=None, w_scale=np.float32(0.01)), ["opset 12 outside", "per output channel"]),
    (dict(opset=26), ["opset 26 outside"]),
    (dict(bias_int32=True), ["DequantizeLinear of int32"]),
    (dict(w=np.array([[[[-128, 0], [0, 0]]], [[[1, 0], [0, 0]]]], np.int8)), ["holds -128"]),
    (dict(act_scale=np.array([0.05, 0.06], np.float32)), ["activation quantized per axis"]),
    (dict(act_scale=np.array([0.05], np.float32)), []),  # a 1-element scale is still per tensor
])
def test_each_tensorrt_rule(kwargs, expected):
    """Each broken rule is reported, and nothing else is."""
    found = tensorrt_violations(qdq_conv(**kwargs))
    assert all(any(e in v for v in found) for e in expected), found
    assert all(any(e in v for e in expected) for v in found), found


PO2_WEIGHTS = np.array([2.0 ** -7, 2.0 ** -6], np.float32)


@pytest.mark.parametrize("act_scale, w_scale, bad", [
    (0.0625, PO2_WEIGHTS, None), (2.0 ** -9, PO2_WEIGHTS, None),
    (0.05, PO2_WEIGHTS, "activation scale 0.05"), (0.0626, PO2_WEIGHTS, "activation scale 0.0626"),
    (0.0625, np.array([2.0 ** -7, 0.02], np.float32), "weight scale 0.02"),  # one channel of a weight
])
def test_fixed_point_rule(act_scale, w_scale, bad):
    found = fixed_point_violations(qdq_conv(act_scale=np.float32(act_scale), w_scale=w_scale))
    if bad is None:
        assert found == []
    else:
        assert found and all("not a power of two" in v for v in found) and any(bad in v for v in found), found


def _float_conv(path, opset=17):
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["output"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])],
        [_init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
         _init("b", rng.normal(size=4).astype(np.float32))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return rng.normal(size=(8, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("symmetric, bias", [(True, False), (False, False), (True, True)])
def test_onnxruntime_quantizer_output(tmp_path, symmetric, bias):
    """onnxruntime's quantizer with the tensorrt preset's settings (int8 symmetric activations,
    symmetric per-channel weights, float biases) writes a conforming file; asymmetric activations
    are flagged at every activation zero point, quantized biases at every int32 DequantizeLinear."""
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    x = _float_conv(src)
    quantize_static(str(src), str(dst), ArrayReader("input", x, batch=1), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                                   "QuantizeBias": bias})
    found = tensorrt_violations(onnx.load(str(dst)))
    want = [] if symmetric and not bias else ["is not 0"] if not symmetric else ["int32"]
    assert bool(found) == bool(want) and all(any(w in v for w in want) for v in found), found


@pytest.fixture(scope="module")
def run(fashion_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("targets") / "run"
    shutil.copytree(fashion_run, out)
    return out


def test_tensorrt_export_conforms(run):
    """A real int8 export for tensorrt, calibrated on the run's own data (no --data), follows every
    rule; the same run's ort-cpu file (uint8, int32 biases) breaks them."""
    entry = json.loads(cli("export", run, "--precision", "int8", "--target", "tensorrt",
                           "--calib-samples", 32, "--json").stdout)
    assert entry["calibration"] == "32 train images from fashion-mnist (the run's data)"
    assert entry["activations"] == "int8" and entry["act_symmetric"] and not entry["quantized_bias"]
    assert tensorrt_violations(onnx.load(str(run / "model.int8.onnx"))) == []
    target = RunDir(run).report()["targets"]["model.int8.onnx"]
    assert target["name"] == "tensorrt" and target["overridden"] == [] and target["check"]["passed"]
    assert RunDir(run).manifest().targets["model.int8.onnx"] == {"target": "tensorrt", "overridden": []}
    text = cli("export", run, "--precision", "int8", "--calib-samples", 32).stdout
    assert "target ort-cpu" in text and "(the run's data)" in text
    found = tensorrt_violations(onnx.load(str(run / "model.int8.onnx")))
    assert any("uint8 tensor" in v for v in found) and any("int32" in v for v in found)
    assert RunDir(run).manifest().targets["model.int8.onnx"]["target"] == "ort-cpu"


def snapshot(run) -> dict:
    """Every file of the run directory and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def test_fp32_export_for_tensorrt(run, tmp_path):
    """An fp32 file that breaks the rules (opset 12) is refused with exit 3 before it is put in
    place: the previous model.onnx, report.json and manifest stay byte for byte, no file is left."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = snapshot(copy)
    r = cli("export", copy, "--target", "tensorrt", "--opset", 12, code=3)
    assert "model.onnx breaks the tensorrt rules: opset 12 outside" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert snapshot(copy) == before


def test_per_channel_needs_opset_13(tmp_path):
    x = _float_conv(tmp_path / "f.onnx", opset=12)
    with pytest.raises(UserInputError, match="per-channel weights need opset 13"):
        quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", QuantOptions("int8", per_channel=True), x)
    assert not (tmp_path / "q.onnx").exists()


def test_failed_check_leaves_no_file(run, tmp_path):
    """--act-type uint8 overrides the tensorrt preset into a file that breaks its rules: exit 3,
    one line naming the rule, and no model.int8.onnx where there was none; where a good one was,
    it stays, with report.json and the manifest, byte for byte."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "model.int8.onnx").unlink(missing_ok=True)
    bad = ["export", copy, "--precision", "int8", "--target", "tensorrt", "--act-type", "uint8",
           "--calib-samples", 16]
    before = snapshot(copy)
    r = cli(*bad, code=3)
    assert "model.int8.onnx breaks the tensorrt rules:" in r.stderr and "uint8" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert snapshot(copy) == before
    cli("export", copy, "--precision", "int8", "--target", "tensorrt", "--calib-samples", 16)
    before = snapshot(copy)
    assert "model.int8.onnx" in before
    cli(*bad, code=3)
    assert snapshot(copy) == before


def test_override_recorded(run, tmp_path):
    """--per-tensor overrides the ort-cpu preset's per-channel weights: recorded, check passed."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cli("export", copy, "--precision", "int8", "--per-tensor", "--calib-samples", 16)
    target = RunDir(copy).report()["targets"]["model.int8.onnx"]
    assert target["overridden"] == ["per_channel"] and target["settings"]["per_channel"] is False
    assert target["check"]["passed"]
    assert RunDir(copy).manifest().targets["model.int8.onnx"] == {"target": "ort-cpu", "overridden": ["per_channel"]}


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8", "--target", "fixed-point"], "--target fixed-point needs a run trained with "
     "power-of-two activation scales (finetune --act-bits A --weight-bits B --scale-format po2); this run was "
     "trained without --act-bits"),
    (["--precision", "int4", "--target", "tensorrt"],
     "--target tensorrt takes --precision fp32 | fp16 | int8, not int4"),
    (["--precision", "int8", "--target", "tensorrt", "--act-bits", "float"], "quantizes activations too"),
    (["--precision", "int8", "--target", "npu"], "unknown target 'npu'; choose one of: ort-cpu, openvino, "
     "tensorrt, fixed-point"),
])
def test_refused(run, args, message):
    before = sorted(p.name for p in run.iterdir())
    r = cli("export", run, *args, code=2)
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == before


def test_act_runs_per_target(run):
    """An --act-bits run's file (trained scales): ort-cpu and openvino take it, tensorrt refuses it,
    fixed-point takes it only from a po2 run."""
    manifest = RunDir(run).manifest()
    manifest.act = SimpleNamespace(bits=8, scale_format="float")
    for name in ("ort-cpu", "openvino"):
        check_run_target(manifest, get_target(name), "int8", False)
    with pytest.raises(UserInputError, match="this target does not take; export it with --target ort-cpu"):
        check_run_target(manifest, get_target("tensorrt"), "int8", False)
    with pytest.raises(UserInputError, match="trained with float activation scales"):
        check_run_target(manifest, get_target("fixed-point"), "int8", False)
    manifest.act.scale_format = "po2"
    check_run_target(manifest, get_target("fixed-point"), "int8", False)
    check_run_target(manifest, get_target("tensorrt"), "fp16", False)  # a float file of the run


def test_int8_without_data_on_a_run_without_data(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    manifest = RunDir(copy).manifest()
    manifest.data = None
    RunDir(copy).write_manifest(manifest)
    r = cli("export", copy, "--precision", "int8", code=2)
    assert "the run was trained without --data: pass --data SPEC" in r.stderr
