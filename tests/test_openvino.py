"""OpenVINO, the second runtime: the files `export` writes for the ort-cpu and openvino targets
(fp32, W8A8 int8, int4 weights) load in its CPU plugin (f32 inference precision) and compute what
onnxruntime computes on real Fashion-MNIST images of a trained run; `eval --runtime openvino`
measures the same accuracy.

Criteria (measured on this run: ResNet-18 at 32 px trained one epoch on 4096 images, 73 % top-1,
OpenVINO 2026.4, 300 test images; on 1000 in brackets):
- fp32 and int4 (weights only, float activations) compute in float in both runtimes and differ by
  summation order only: rel error about 1e-6, checked at 1e-5, top-1 agreement 1.0.
- int8 files quantize every activation to uint8 up to the classifier, whose logits are float (one
  integer Gemm, convert/quantize/tail.py). OpenVINO runs a Conv whose output feeds only a residual
  Add as one convolution with the Add fused in, and skips the Q/DQ pair between them; the openvino
  target's file has no such pair (convert/quantize/placement.py), so both runtimes compute the same
  network and differ only where a requantized value lies within float rounding of half a step:
  top-1 agreement 1.0 (0.999), logits rel 0.009 (0.012); checked: >= 0.99 and <= 0.03.
- the ort-cpu target's int8 file keeps the pair (onnxruntime needs it for its integer convolution:
  without it the file ran 0.22x as fast there). OpenVINO computes the openvino file's network from
  it (checked: OpenVINO on the ort-cpu file agrees with onnxruntime on the openvino file as the
  runtimes agree on that file, and better than with onnxruntime on the ort-cpu file), so on it the
  runtimes agree on 0.987-0.993 of top-1 decisions (0.986-0.992 for 64 to 256 calibration
  images), logits rel 0.017-0.023: checked >= 0.97 and <= 0.05. The issue's 0.99 holds for every
  file of the openvino target, not for the ort-cpu int8 file (a file for onnxruntime).
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import onnx
import pytest
from helpers import cli

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.metrics import compare_logits
from wnconvert.convert.openvino_rt import ov_compile, run_runtime
from wnconvert.models.data.data import eval_arrays
from wnconvert.models.run.accuracy import artifact_accuracy
from wnconvert.models.run.rundir import RunDir

DATA = "fashion-mnist"
N_IMAGES = 300
FLOAT_RTOL = 1e-5
INT8_MAX_REL = 0.03
INT8_MIN_AGREEMENT = 0.99
ORT_CPU_INT8_MAX_REL = 0.05  # the ort-cpu file in OpenVINO (see above)
ORT_CPU_INT8_MIN_AGREEMENT = 0.97


@pytest.fixture(scope="module")
def run(fashion_run, tmp_path_factory):
    """The shared trained run with its int4 file and its int8 file for the openvino target (the
    ort-cpu target's settings; calibrated on the run's own data: no --data)."""
    out = tmp_path_factory.mktemp("ov") / "run"
    shutil.copytree(fashion_run, out)
    cli("export", out, "--precision", "int8", "--target", "openvino", "--calib-samples", 64)
    cli("export", out, "--precision", "int4")
    return out


@pytest.fixture(scope="module")
def images(run):
    return eval_arrays(DATA, RunDir(run).manifest().preprocess, limit=N_IMAGES)[0]


def both(path, x):
    return run_runtime("onnxruntime", path, x), run_runtime("openvino", path, x)


@pytest.mark.parametrize("name", ["model.onnx", "model.int4.onnx"])
def test_float_files_agree(run, images, name):
    ort, ov = both(run / name, images)
    c = compare_logits(ort, ov)
    assert c["rel"] <= FLOAT_RTOL and c["top1_agreement"] == 1.0, c


def test_int8_logits_are_float(run):
    """The int8 file's classifier is one integer Gemm writing float logits (no uint8 grid)."""
    model = onnx.load(str(run / "model.int8.onnx"))
    last = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
    assert last.op_type == "Gemm"
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}


@pytest.fixture(scope="module")
def ort_cpu_int8(fashion_run, tmp_path_factory):
    """The same run's int8 file for the ort-cpu target (the same calibration images)."""
    out = tmp_path_factory.mktemp("ov_ort") / "run"
    shutil.copytree(fashion_run, out)
    cli("export", out, "--precision", "int8", "--target", "ort-cpu", "--calib-samples", 64)
    return out / "model.int8.onnx"


def test_int8_file_agrees(run, images):
    ort, ov = both(run / "model.int8.onnx", images)
    c = compare_logits(ort, ov)
    assert c["top1_agreement"] >= INT8_MIN_AGREEMENT and c["rel"] <= INT8_MAX_REL, c


def _conv_outputs_read_by_add(path) -> int:
    model = onnx.load(str(path))
    convs = {n.output[0] for n in model.graph.node if n.op_type == "Conv"}
    return sum(name in convs for n in model.graph.node if n.op_type == "Add" for name in n.input)


def test_residual_adds_read_float_convs_for_openvino_only(run, ort_cpu_int8):
    assert _conv_outputs_read_by_add(run / "model.int8.onnx") == 8  # one per ResNet-18 block
    assert _conv_outputs_read_by_add(ort_cpu_int8) == 0
    report = json.loads((run / "report.json").read_text())["quantized"]["int8"]
    assert report["residual_conv"] == "float" and report["target"]["settings"]["residual_conv"] == "float"


def test_golden_refuses_the_openvino_file(run, tmp_path):
    r = cli("golden", run, "--out", tmp_path / "golden", code=2)
    assert "--target openvino" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "golden").exists()


def test_openvino_skips_the_requantization_before_a_residual_add(run, ort_cpu_int8, images):
    """What the openvino file leaves out is what OpenVINO skips in the ort-cpu file."""
    ort_own, ov_own = both(ort_cpu_int8, images)
    ort_openvino_file = run_runtime("onnxruntime", run / "model.int8.onnx", images)
    c = compare_logits(ort_openvino_file, ov_own)
    assert c["top1_agreement"] >= INT8_MIN_AGREEMENT and c["rel"] <= INT8_MAX_REL, c
    own = compare_logits(ort_own, ov_own)  # onnxruntime requantizes where OpenVINO does not
    assert own["rel"] > c["rel"] and own["top1_agreement"] <= c["top1_agreement"], (own, c)
    assert own["top1_agreement"] >= ORT_CPU_INT8_MIN_AGREEMENT and own["rel"] <= ORT_CPU_INT8_MAX_REL, own


def test_f32_precision_is_set(run):
    hint = ov_compile(run / "model.onnx").get_property("INFERENCE_PRECISION_HINT")
    assert str(hint) in ("<Type: 'float32'>", "f32")


def test_eval_runtime_openvino(run):
    """`eval --runtime openvino` counts what onnxruntime counts (the fp32 file: the same top-1)."""
    ort = artifact_accuracy(run / "model.onnx", DATA, limit=N_IMAGES, batch=100)
    r = cli("eval", run / "model.onnx", "--data", DATA, "--limit", N_IMAGES, "--batch-size", 100,
               "--runtime", "openvino", "--json")
    ov = json.loads(r.stdout)
    assert ov["runtime"] == "openvino" and ov["backend"].startswith("openvino") and ov["images"] == N_IMAGES
    assert ov["top1"] == ort["top1"] and ov["top5"] == ort["top5"] and ov["images_per_s"] > 0
    text = cli("eval", run / "model.int4.onnx", "--data", DATA, "--limit", 32, "--runtime", "openvino").stdout
    assert "openvino" in text and "images/s" in text


@pytest.mark.parametrize("args, message", [
    (["--runtime", "tensorrt"], "unknown runtime 'tensorrt'; choose one of: onnxruntime, openvino"),
    (["--runtime", "openvino", "--provider", "cuda"], "CPU plugin only"),
])
def test_bad_runtime_cli(run, args, message):
    r = cli("eval", run / "model.onnx", "--data", DATA, "--limit", 4, *args, code=2)
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_runtime_inputs(run, monkeypatch, tmp_path):
    with pytest.raises(UserInputError, match="runs an .onnx file"):
        artifact_accuracy(run / "checkpoint.safetensors", DATA, runtime="openvino")
    with pytest.raises(UserInputError, match="not an .onnx file"):
        run_runtime("openvino", run / "manifest.json", np.zeros((1, 3, 32, 32), np.float32))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(UserInputError, match="OpenVINO cannot read"):
        run_runtime("openvino", garbage, np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(UserInputError, match="OpenVINO cannot run"):
        run_runtime("openvino", run / "model.onnx", np.zeros((1, 3, 20, 20), np.float32))
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(UserInputError, match="pip install openvino"):
        run_runtime("openvino", run / "model.onnx", np.zeros((1, 3, 32, 32), np.float32))
