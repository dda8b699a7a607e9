"""Refusals the options and the manifest decide come before torch, onnx, the data or the model
load (models/precheck.py): every such path of export / verify / golden / eval, run in one fresh
interpreter, answers one line on stderr with exit 2, in well under a second, with no heavy module
loaded; the library functions behind the commands use the same checks."""

import json
import subprocess
import sys
from pathlib import Path

from test_cli_startup import HEAVY

from wnconvert.convert.quantize.targets import PRESETS
from wnconvert.models.run import precheck

CHILD = f"""
import contextlib, io, json, sys, time
from wnconvert.cli.main import main
cases, out = json.loads(sys.argv[1]), []
for argv in cases:
    err, t = io.StringIO(), time.perf_counter()
    sys.argv = ["wnconvert", *argv]
    code = None
    with contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code
    out.append([code, err.getvalue(), time.perf_counter() - t])
print(json.dumps(out))
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""


def _run(tmp_path: Path, name: str, *, act: dict | None = None, weight_bits: int | None = 8,
         data: str | None = None, files=()) -> Path:
    run = tmp_path / name
    run.mkdir()
    manifest = {"version": 1, "status": "complete", "model": "resnet18", "num_classes": 10,
                "preprocess": {"image_size": 32}, "data": data,
                "scheme": {"scheme": "channel-max", "weight_bits": weight_bits}, "act": act}
    (run / "manifest.json").write_text(json.dumps(manifest))
    for f in files:
        (run / f).write_bytes(b"not read")
    return run


def test_manifest_decided_refusals_load_nothing(tmp_path):
    w8a8 = _run(tmp_path, "w8a8", act={"bits": 8, "scale_format": "float"})
    w4a4 = _run(tmp_path, "w4a4", act={"bits": 4, "scale_format": "float"}, weight_bits=4)
    plain = _run(tmp_path, "plain", files=["model.onnx", "model.int8.onnx"])
    bare = _run(tmp_path, "bare")
    cases = {
        ("export", w8a8, "--precision", "int4"):
            "this run trained 8-bit weights: export it with --precision int8, not int4",
        ("export", w4a4, "--precision", "int8"):
            "this run trained 4-bit weights: export it with --precision int4, not int8",
        ("export", w8a8, "--precision", "int8", "--act-bits", "4"):
            "this run trained 8-bit activations; --act-bits 4 does not match (leave it out)",
        ("export", w8a8, "--precision", "int8", "--data", "synthetic:4"):
            "an --act-bits run exports its trained activation scales; it takes no calibration --data",
        ("export", w8a8, "--precision", "int8", "--target", "fixed-point"):
            "--target fixed-point needs a run trained with power-of-two activation scales (finetune --act-bits A "
            "--weight-bits B --scale-format po2); this run was trained with float activation scales",
        ("export", plain, "--precision", "int8", "--target", "fixed-point"):
            "--target fixed-point needs a run trained with power-of-two activation scales (finetune --act-bits A "
            "--weight-bits B --scale-format po2); this run was trained without --act-bits",
        ("export", w8a8, "--precision", "int8", "--target", "tensorrt"):
            "--target tensorrt: an --act-bits run's file keeps its trained integers (unsigned activations, int32 "
            "biases), which this target does not take; export it with --target ort-cpu or openvino",
        ("export", plain, "--precision", "int4", "--target", "tensorrt"):
            "--target tensorrt takes --precision fp32 | fp16 | int8, not int4",
        ("export", plain, "--precision", "int8", "--act-bits", "float", "--target", "tensorrt"):
            "--target tensorrt quantizes activations too (explicit int8 Q/DQ); --act-bits float (weights only) "
            "is not one of its files",
        ("export", w8a8, "--precision", "int8", "--container", "int8"):
            "--container stores the 4-bit values of int4 files; --precision int8 has none (leave it out)",
        ("export", w8a8, "--container", "int4"):
            "--container stores the 4-bit values of int4 files; --precision fp32 has none (leave it out)",
        ("export", plain, "--precision", "int8"):
            "--precision int8 quantizes activations and needs calibration data; the run was trained without "
            "--data: pass --data SPEC (or --act-bits float for weights only)",
        ("export", plain, "--precision", "int4", "--act-bits", "7"): "--act-bits must be 8 or float, not '7'",
        ("export", plain, "--precision", "int8", "--data", "synthetic:4", "--calib-samples", "0"):
            "--calib-samples must be at least 1",
        ("export", bare, "--precision", "int8"):
            f"{bare} has no model.onnx; run `wnconvert export {bare}` first",
        ("export", tmp_path / "nothing", "--precision", "int8"): f"{tmp_path / 'nothing'} is not a run directory",
        ("export", tmp_path, "--precision", "int8"):
            f"{tmp_path} has no manifest.json; is it a wnconvert run directory?",
        ("verify", w8a8, "--precision", "int8"):
            f"{w8a8}/model.int8.onnx does not exist; run `wnconvert export {w8a8} --precision int8` first",
        ("verify", w8a8, "--precision", "int8", "--onnx", plain / "model.onnx"):
            "give --onnx or --precision, not both",
        ("verify", bare): f"{bare}/model.onnx does not exist; run `wnconvert export {bare}` first",
        ("golden", plain, "--out", tmp_path / "g"):
            f"{plain} was made without --data: give the images with --data SPEC",
        ("golden", plain, "--out", plain, "--data", "synthetic:4"):
            "--out must be a folder of its own, not the run directory",
        ("golden", plain, "--out", tmp_path / "g", "--precision", "fp16"):
            "--precision must be one of int8, int4, tflite, qonnx, not 'fp16'",
        ("golden", w8a8, "--out", tmp_path / "g", "--precision", "int4"):
            f"{w8a8}/model.int4.onnx does not exist; run `wnconvert export {w8a8} --precision int4` first",
        ("golden", plain, "--out", tmp_path / "g", "--count", "0"): "--count must be between 1 and 1024 (the integer "
                                                                    "reference holds every tensor of every image in "
                                                                    "memory)",
        ("export", plain, "--target", "qonnx"):
            "--target qonnx writes the trained integer network of an --act-bits run; this run was trained without "
            "--act-bits (finetune --weight-bits B --act-bits A)",
        ("export", w8a8, "--target", "qonnx", "--precision", "int8"):
            "--target qonnx writes model.qonnx.onnx from the run's trained network; --precision does not apply to "
            "it (leave it out)",
        ("export", w4a4, "--target", "tflite-micro"):
            "--target tflite-micro writes int8 weights and activations; this run trained W4A4 (train --weight-bits 8 "
            "--act-bits 8, or export an fp32 run)",
        ("export", w8a8, "--target", "tflite-micro", "--data", "synthetic:4"):
            "an --act-bits run exports its trained activation scales; it takes no calibration --data",
        ("export", plain, "--target", "tflite-micro", "--act-bits", "4"):
            "--target tflite-micro quantizes activations to int8; --act-bits 4 does not fit (leave it out)",
        ("export", plain, "--target", "tflite-micro"):
            "--target tflite-micro calibrates the int8 activations of an fp32 run; the run was trained without "
            "--data: pass --data SPEC",
        ("export", plain, "--target", "ethos-u55-128"):
            f"{plain} has no model.int8.tflite: write it first with `wnconvert export {plain} --target tflite-micro`",
        ("export", plain, "--target", "ethos-u65-256", "--precision", "int4"):
            "--target ethos-u65-256 compiles the run's int8 .tflite; --precision int4 is refused (Vela crashes on "
            "INT4 weights)",
        ("eval", tmp_path / "none.onnx", "--data", "synthetic:4"): f"{tmp_path / 'none.onnx'} does not exist",
        ("eval", plain / "model.onnx", "--data", "synthetic:4", "--batch-size", "0"):
            "--batch-size must be at least 1",
    }
    argvs = [[str(a) for a in argv] for argv in cases]
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argvs)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    results, loaded = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    for (argv, message), (code, err, seconds) in zip(cases.items(), results):
        assert (code, err.splitlines()) == (2, [f"wnconvert: error: {message}"]), argv
        assert seconds < 1.0, (argv, seconds)
    assert loaded == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "plain", "w4a4", "w8a8"]  # nothing written


def test_light_tables_equal_the_heavy_registries():
    assert precheck.TARGET_TAKES == {n: (p.precisions, p.weights_only, p.act_runs) for n, p in PRESETS.items()}
