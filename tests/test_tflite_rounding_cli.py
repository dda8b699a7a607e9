"""``finetune --rounding tflite`` on the command line: refused without po2 activation quantization
(one line, exit 2, nothing written), recorded in the manifest, given back to --config, restored with
the run's QAT model and by --resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_config_file import run_cli

from wnconvert.convert.actquant import quantizers
from wnconvert.models.run.rundir import RunDir
from wnconvert.models.train.act_run import ActSettings

BASE = ["finetune", "resnet18", "--weights", "none", "--num-classes", 10, "--image-size", 32, "--data",
        "synthetic:10", "--samples", 2, "--weight-bits", 8, "--limit-val", 4, "--limit-train", 4, "--batch-size", 4,
        "--workers", 0]


@pytest.mark.parametrize("extra", [["--act-bits", 8], [], ["--act-bits", 8, "--scale-format", "float"]])
def test_refused_without_po2_act_bits(tmp_path: Path, capsys, extra) -> None:
    code, out, err = run_cli(*BASE, *extra, "--rounding", "tflite", "--out", tmp_path / "r", capsys=capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--rounding tflite" in err and "po2" in err
    assert not (tmp_path / "r").exists()


def test_recorded_repeated_and_restored(tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(*BASE, "--epochs", 1, "--act-bits", 8, "--scale-format", "po2", "--rounding", "tflite",
                             "--no-export", "--out", tmp_path / "a", "--json", capsys=capsys)
    assert code == 0, err
    act = json.loads(out)["manifest"]["act"]
    assert act["rounding"] == "tflite" and act["scale_format"] == "po2"
    assert ActSettings.from_dict(act).rounding == "tflite"          # what --resume reads back
    qat = RunDir(tmp_path / "a").load_qat()[1]
    assert {q.rounding for q in quantizers(qat).values()} == {"tflite"}
    # --config RUN gives finetune the recorded option back (the mapping a repeated run goes through)
    from wnconvert.models.run.config_file import _from_manifest
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert _from_manifest(manifest, tmp_path / "a")["rounding"] == "tflite"
    # a manifest written before the option existed reads as ONNX's rounding
    old = {k: v for k, v in act.items() if k != "rounding"}
    assert ActSettings.from_dict(old).rounding == "onnx"

    # the end state: its .tflite in TensorFlow Lite Micro holds the trained model's integers at every point
    run = tmp_path / "a"
    code, out, err = run_cli("export", run, "--target", "tflite-micro", capsys=capsys)
    assert code == 0, err
    code, out, err = run_cli("verify", run, "--tflite", run / "model.int8.tflite", "--limit", 2, "--json",
                             capsys=capsys)
    assert code == 0, err
    res = json.loads(out)["tflite"]["model.int8.tflite"]
    exact = res["bit_exact"]
    assert exact["passed"] and exact["missing"] == [] and exact["compared"] == len(quantizers(qat))
    assert exact["elements"] > 0 and {t["differ"] for t in exact["tensors"]} == {0}
    # with the model's TFLite arithmetic taken out (ONNX's rounding at every point), the contract fails
    from wnconvert.convert.actquant import tflite_points
    from wnconvert.models.run.tflite_verify import verify_tflite_file
    onnx_like = lambda q, x, inputs: torch.round(x.double() / q.scale_value()).to(torch.int64)
    real = tflite_points.tflite_integers
    tflite_points.tflite_integers = onnx_like
    try:
        x = np.asarray(torch.randn(2, 3, 32, 32), np.float32)
        broken = verify_tflite_file(run, run / "model.int8.tflite", x, "2 generated inputs")
    finally:
        tflite_points.tflite_integers = real
    assert not broken["bit_exact"]["passed"] and "differ" in broken["bit_exact"]["failures"][0]
