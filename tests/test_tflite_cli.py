"""``wnconvert export RUN --target tflite-micro`` through the real command line on a run whose network
has an operator TensorFlow Lite Micro lacks (MobileNetV3's Hardswish, ONNX's HardSigmoid inside it):
exit 2, one line naming the operator, the run directory unchanged to the byte."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from helpers import cli

pytest.importorskip("tflite")


def _snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` (hidden ones included) and its sha256; directories as ``/``. The run's
    ``.lock`` is listed but not hashed: every writing command locks the run first and the file records
    the last holder's pid (models/run/lock.py)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            seen[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            digest = "lock" if f == ".lock" else hashlib.sha256(Path(p).read_bytes()).hexdigest()
            seen[os.path.relpath(p, root)] = digest
    return seen


@pytest.fixture(scope="module")
def hardswish_run(tmp_path_factory):
    """An fp32 MobileNetV3-Small at 32 px (untrained: its operators are the point) with its model.onnx."""
    out = tmp_path_factory.mktemp("tflite_cli") / "run"
    cli("finetune", "mobilenet_v3_small", "--weights", "none", "--num-classes", "10", "--image-size", "32",
        "--data", "synthetic:10", "--epochs", "0", "--samples", "2", "--workers", "0", "--device", "cpu",
        "--out", out)
    assert (out / "model.onnx").is_file()
    return out


def test_operator_micro_lacks_is_exit_2_naming_it_nothing_written(hardswish_run):
    before = _snapshot(hardswish_run)
    r = cli("export", hardswish_run, "--target", "tflite-micro", "--calib-samples", "1", code=2)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wnconvert: error: "), r.output
    assert "HardSigmoid" in lines[0] and "_HardSwish_" in lines[0] and "Traceback" not in r.output
    assert _snapshot(hardswish_run) == before
    assert not (hardswish_run / "model.int8.tflite").exists()
