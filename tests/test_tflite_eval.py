"""``wnconvert eval RUN/model.int8.tflite --data D``: top-1/top-5 and images/s of a .tflite in TensorFlow
Lite Micro (default) or LiteRT, with the run's preprocessing, NHWC and the input's quantization;
a truncated or crafted file is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tflite_micro")

from test_config_file import run_cli
from tflite_tiny import run_micro, small_classifier

from wnconvert.models.data.data import eval_arrays
from wnconvert.models.run.rundir import RunDir

DATA = "synthetic:10"
IN_SCALE = 2.0 ** -5


def _run_with(tmp_path: Path, bare: Path, data: bytes) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text((bare / "manifest.json").read_text())
    (run / "model.int8.tflite").write_bytes(data)
    return run


def test_eval_tflite_micro_and_litert(tmp_path, bare_run, capsys):
    data = small_classifier(size=32, channels=3, classes=10, seed=4, in_scale=IN_SCALE)
    run = _run_with(tmp_path, bare_run, data)
    code, out, err = run_cli("eval", run / "model.int8.tflite", "--data", DATA, "--limit", 24, "--json",
                             capsys=capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["images"] == 24 and res["runtime"] == "tflite-micro" and res["images_per_s"] > 0
    # the same images, preprocessed as the run says, quantized by hand and run image by image
    images, labels = eval_arrays(DATA, RunDir(run).manifest().preprocess, limit=24)
    k = np.clip(np.round(images.transpose(0, 2, 3, 1) / np.float32(IN_SCALE)), -128, 127).astype(np.int8)
    logits = np.concatenate([run_micro(data, k[i:i + 1]) for i in range(len(k))]).astype(np.float64)
    assert res["top1"] == pytest.approx(float(np.mean(logits.argmax(1) == labels)))
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    assert 0 <= res["top1"] <= res["top5"] and res["top5"] >= float(np.mean((top5 == labels[:, None]).any(1))) - 0.09
    code, out, err = run_cli("eval", run / "model.int8.tflite", "--data", DATA, "--limit", 24, "--runtime", "litert",
                             "--json", capsys=capsys)
    assert code == 0, err
    lit = json.loads(out)
    assert lit["runtime"] == "litert" and lit["images"] == 24 and lit["top1"] == pytest.approx(res["top1"], abs=1 / 24)


@pytest.mark.parametrize("case", ["truncated", "garbage", "not_an_image_model", "onnx_runtime"])
def test_bad_files_are_one_line_exit_2(tmp_path, bare_run, capsys, case):
    data = small_classifier(size=32)
    args = []
    if case == "truncated":
        data = data[: len(data) // 2]
    elif case == "garbage":
        data = b"\x18\x00\x00\x00TFL3" + bytes(range(256)) * 4
    elif case == "not_an_image_model":
        from tflite_tiny import Builder
        b = Builder()
        x = b.tensor((1, 8), np.int8, 0.1, 0)
        y = b.fully_connected(x, np.ones((4, 8), np.int8), [0.01] * 4, np.zeros(4, np.int32), 0.1)
        data = b.finish([x], [y])
    elif case == "onnx_runtime":
        args = ["--runtime", "openvino"]
    run = _run_with(tmp_path, bare_run, data)
    code, out, err = run_cli("eval", run / "model.int8.tflite", "--data", DATA, "--limit", 2, *args, capsys=capsys)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "model.int8.tflite" in err + out
