"""OpenVINO, the second runtime: the files `export` writes for the ort-cpu and openvino targets
(fp32, W8A8 int8, int4 weights) load in its CPU plugin (f32 inference precision) and compute what
onnxruntime computes on real Fashion-MNIST images of a trained run; `eval --runtime openvino`
measures the same accuracy.

Criteria (measured on this run: ResNet-18 at 32 px trained on 128 images, OpenVINO 2026.4):
- fp32 and int4 (weights only, float activations) compute in float in both runtimes and differ by
  summation order only: rel error about 2e-6, checked at 1e-5, top-1 agreement 1.0.
- int8 files quantize every activation, the logits included, to uint8. Both runtimes follow the
  QDQ semantics, but their requantization rounds values lying near a half step differently (float
  multiply order) and one-step differences compound with depth: measured 17-23 % of logits
  bit-identical (OpenVINO running the fp32 file instead: 0.03 %), at most 7-9 output steps apart
  (the fp32 file: 15). On this barely trained network top-2 margins of a few steps are common and
  top-1 agreement is 0.90-0.96 (the fp32 file against the int8 one agrees as often: top-1 alone
  cannot tell files apart); on a ResNet-18 trained on 4096 images (73 % top-1) 58 % of logits are
  identical, at most 3 steps apart, and agreement is 0.977-0.986 (benchmarks/runtimes_speed.py,
  docs/results.md): the issue's 0.99 is not reached by int8 files, only by the float ones (1.0).
  Checked: >= 10 % of logits identical, all within 12 steps, top-1
  agreement >= 0.85; and the same criteria reject OpenVINO running the fp32 file.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.metrics import compare_logits
from wnconvert.convert.openvino_rt import ov_compile, run_runtime
from wnconvert.models.accuracy import artifact_accuracy
from wnconvert.models.data import eval_arrays
from wnconvert.models.rundir import RunDir

from helpers import cli

DATA = "fashion-mnist"
N_IMAGES = 300
FLOAT_RTOL = 1e-5
INT8_MAX_STEPS = 12
INT8_MIN_IDENTICAL = 0.10
INT8_MIN_AGREEMENT = 0.85


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


def int8_agrees(ort: np.ndarray, ov: np.ndarray) -> bool:
    """The int8 criteria of the module docstring (``ort``'s logits lie on a uint8 grid)."""
    steps = np.abs(ort - ov) / np.diff(np.unique(ort)).min()
    agreement = (ort.argmax(1) == ov.argmax(1)).mean()
    return bool(steps.max() <= INT8_MAX_STEPS + 1e-3 and (steps < 1e-3).mean() >= INT8_MIN_IDENTICAL
                and agreement >= INT8_MIN_AGREEMENT)


def test_int8_file_agrees(run, images):
    assert int8_agrees(*both(run / "model.int8.onnx", images))


def test_int8_criteria_tell_files_apart(run, images):
    ort = run_runtime("onnxruntime", run / "model.int8.onnx", images)
    assert not int8_agrees(ort, run_runtime("openvino", run / "model.onnx", images))


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
