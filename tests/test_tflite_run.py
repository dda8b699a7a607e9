"""``export RUN --target tflite-micro``, ``verify`` of the .tflite and ``golden --precision tflite`` on
a trained run (the session's Fashion-MNIST ResNet-18, calibrated to TFLite's int8 scheme), with
TensorFlow Lite Micro and LiteRT as the runtimes; bad .tflite files and refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import cli

from wnconvert.convert.artifacts import sha256
from wnconvert.convert.tflite.flatbuf import parse, to_bytes
from wnconvert.models.run.rundir import RunDir

pytest.importorskip("tflite_micro")
pytest.importorskip("ai_edge_litert")

CALIB = ["--calib-samples", "32"]


@pytest.fixture(scope="module")
def run(fashion_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite") / "run"
    shutil.copytree(fashion_run, out, ignore=shutil.ignore_patterns("train"))
    entry = json.loads(cli("export", out, "--target", "tflite-micro", *CALIB, "--json").stdout)
    assert entry["file"] == "model.int8.tflite" and entry["scales"] == "calibrated"
    return out


def test_export_writes_a_recorded_int8_file(run):
    manifest = RunDir(run).manifest()
    assert manifest.artifacts["model.int8.tflite"] == sha256(run / "model.int8.tflite")
    entry = RunDir(run).report()["tflite"]
    assert entry["input"]["dtype"] == "int8" and entry["output"]["dtype"] == "int8"
    assert set(entry["operators"]) <= {"CONV_2D", "PAD", "MAX_POOL_2D", "ADD", "MEAN", "RESHAPE", "FULLY_CONNECTED"}
    model = parse((run / "model.int8.tflite").read_bytes())
    weights = [t for t in model.tensors if t.data is not None and t.dtype == "int8"]
    assert weights and all(np.all(t.zero_point == 0) and t.scale.size == t.shape[0] for t in weights)
    assert all(t.dtype == "int8" for t in model.tensors if t.data is None)


def test_verify_micro_reference_litert_and_trained_network(run):
    r = cli("verify", run, "--tflite", run / "model.int8.tflite", "--limit", "24", "--json")
    res = json.loads(r.stdout)["tflite"]["model.int8.tflite"]
    assert res["passed"] and res["micro_equals_reference"] and res["litert_ref_equals_micro"], res["failures"]
    assert res["contract"] == "tflite-one-step" and res["inputs"] == "24 images from fashion-mnist"
    one = res["one_step"]
    assert 0 < one["elements"] < 0.01 * one["of"]  # double rounding moves a few elements by one step
    assert all(t["max_steps"] <= 1 for t in one["tensors"].values())
    assert res["top1"]["images"] == 24 and res["top1"]["agreement"] >= 0.9
    assert "xnnpack" in res and RunDir(run).report()["verify"]["tflite"]["model.int8.tflite"]["passed"]


def test_tampered_weight_is_named(run, tmp_path):
    path = run / "model.int8.tflite"
    saved = path.read_bytes()
    kept = {name: (run / name).read_text() for name in ("manifest.json", "report.json")}
    model = parse(saved)
    w = next(t for t in model.tensors if t.data is not None and t.dtype == "int8" and t.data.ndim == 4)
    flat = w.data.reshape(-1)
    flat[7] = flat[7] + (1 if flat[7] < 127 else -1)  # one integer one step away
    try:
        path.write_bytes(to_bytes(model))
        run_dir = RunDir(run)
        manifest = run_dir.manifest()
        run_dir.record(manifest, "model.int8.tflite")  # hashes re-recorded: only the weights tell
        r = cli("verify", run, "--tflite", path, "--limit", "4", code=3)
        assert f"tensor '{w.name}' differs from the run's trained integers in 1 of" in r.output
    finally:
        path.write_bytes(saved)
        for name, text in kept.items():
            (run / name).write_text(text)


@pytest.mark.parametrize("damage", ["truncated", "crafted", "empty"])
def test_damaged_file_is_one_line_exit_2(run, tmp_path, damage):
    data = (run / "model.int8.tflite").read_bytes()
    bad = tmp_path / "bad.tflite"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 3])
    elif damage == "crafted":
        rng = np.random.default_rng(0)
        bad.write_bytes(data[:8] + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    else:
        bad.write_bytes(b"")
    golden = ["golden", run, "--precision", "tflite", "--onnx", bad, "--out", tmp_path / "g", "--count", "1"]
    # verify checks every hash and loads the run first (seconds): once is enough
    for args in ([["verify", run, "--tflite", bad]] if damage == "truncated" else []) + [golden]:
        r = cli(*args, code=2)
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
        assert str(bad) in r.output


def test_golden_vectors_are_what_micro_computes(run, tmp_path):
    from tflite_micro import runtime

    s = json.loads(cli("golden", run, "--precision", "tflite", "--out", tmp_path / "g", "--count", "3",
                       "--json").stdout)
    assert s["images"] == 3
    index = json.loads((tmp_path / "g" / "index.json").read_text())
    golden = np.load(tmp_path / "g" / "golden.npz")
    assert index["format"] == "wnconvert-golden-tflite/1"
    conv = next(layer for layer in index["layers"] if layer["op"] == "CONV_2D")
    assert len(conv["multiplier"]) == conv["shape"][-1] and all(2 ** 30 <= m < 2 ** 31 for m in conv["multiplier"])
    it = runtime.Interpreter.from_bytes((run / "model.int8.tflite").read_bytes())
    x = golden[index["network_input"]]
    last = index["layers"][-1]["tensor"]
    for i in range(3):
        it.set_input(x[i:i + 1], 0)
        it.invoke()
        np.testing.assert_array_equal(it.get_output(0)[0], golden[last][i])
        it.reset()


@pytest.mark.parametrize("args, message", [
    (["--precision", "int4"], "--target tflite-micro writes one int8 file"),
    (["--act-type", "uint8"], "--target tflite-micro writes one int8 file"),
    (["--per-tensor"], "per-channel weights"),
])
def test_refused_before_anything_is_written(run, args, message):
    before = sha256(run / "model.int8.tflite")
    r = cli("export", run, "--target", "tflite-micro", *args, code=2)
    assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert sha256(run / "model.int8.tflite") == before


def test_io_applies_to_tflite_only(run):
    r = cli("export", run, "--precision", "int8", "--io", "float", code=2)
    assert "--io applies to --target tflite-micro" in r.output


def test_io_float_export_verify_and_eval(run, tmp_path):
    """``--io float``: float32 input through QUANTIZE, float32 logits through DEQUANTIZE; verify passes
    and eval scores the file as it scores the int8 one (same integers in between)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("train", "model.int8.tflite"))
    entry = json.loads(cli("export", copy, "--target", "tflite-micro", "--io", "float", *CALIB, "--json").stdout)
    assert entry["io"] == "float" and entry["input"]["dtype"] == "float32" and entry["output"]["dtype"] == "float32"
    model = parse((copy / "model.int8.tflite").read_bytes())
    assert model.ops[0].op == "QUANTIZE" and model.ops[-1].op == "DEQUANTIZE"
    assert [model.tensors[i].dtype for i in model.inputs + model.outputs] == ["float32", "float32"]
    inner = parse((run / "model.int8.tflite").read_bytes())
    assert [o.op for o in model.ops[1:-1]] == [o.op for o in inner.ops]  # the same integer graph between
    res = json.loads(cli("verify", copy, "--tflite", copy / "model.int8.tflite", "--limit", "8", "--json").stdout)
    res = res["tflite"]["model.int8.tflite"]
    assert res["passed"] and res["io"] == "float" and res["micro_equals_reference"], res["failures"]
    scores = {}
    for name, path in (("float", copy / "model.int8.tflite"), ("int8", run / "model.int8.tflite")):
        scores[name] = json.loads(cli("eval", path, "--data", "fashion-mnist", "--limit", "16", "--json").stdout)
    assert scores["float"]["images"] == 16 and scores["float"]["runtime"] == "tflite-micro"
    assert (scores["float"]["top1"], scores["float"]["top5"]) == (scores["int8"]["top1"], scores["int8"]["top5"])
    # LiteRT too, on files whose RESHAPE (the flatten) holds the batch of 1 (once exit 70 for a batch of 32)
    for path in (copy / "model.int8.tflite", run / "model.int8.tflite"):
        lit = json.loads(cli("eval", path, "--data", "fashion-mnist", "--limit", "16", "--runtime", "litert",
                             "--json").stdout)
        assert lit["images"] == 16 and lit["runtime"] == "litert"
        assert lit["top1"] == pytest.approx(scores["int8"]["top1"], abs=2 / 16)  # XNNPACK: a step off at times
