"""``finetune --act-bits``: a run trained with activation quantization, exported with its trained
scales and verified under the lossless-activations contract (models/train/act_run.py, act_files.py)."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from helpers import assert_same_tensors, interrupt_and_resume
from safetensors.torch import load_file
from typer.testing import CliRunner

from wnconvert.cli.main import app
from wnconvert.convert.actquant import act_points, quantizers
from wnconvert.models.train.optim import build_optimizer
from wnconvert.models.run.rundir import RunDir

TINY = ["--weights", "none", "--image-size", "32", "--num-classes", "10", "--data", "synthetic:10",
        "--workers", "0", "--device", "cpu", "--batch-size", "32", "--samples", "2"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def act_run(out, *extra):
    """2 epochs (BatchNorm frozen in the second), resnet18 at 32 px on 32 synthetic images."""
    torch.manual_seed(0)  # --weights none initializes from the global RNG
    return cli("finetune", "resnet18", *TINY, "--limit-train", "32", "--limit-val", "32", "--epochs", "2",
               "--batch-size", "16", "--weight-bits", "8", "--act-bits", "8", *extra, "--out", out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("act") / "run"
    r = act_run(out, "--diagnostics", "2")
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("model, extra, message", [
    ("resnet18", [], "--act-bits needs --weight-bits"),
    ("resnet18", ["--weight-bits", "8", "--scheme", "weight-norm"], "fixed"),
    ("mobilenet_v3_small", ["--weight-bits", "8"], "Hardswish"),
    ("mobilenet_v3_small", ["--weight-bits", "8", "--mixed-precision", "--scale-format", "po2"], "choose one"),
])
def test_refused_before_anything_is_written(tmp_path, model, extra, message):
    out = tmp_path / "run"
    r = cli("finetune", model, *TINY, "--limit-train", "8", "--limit-val", "8", "--epochs", "1",
            "--act-bits", "8", *extra, "--out", out)
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()


def test_run_holds_the_qat_model(trained):
    manifest = json.loads((trained / "manifest.json").read_text())
    assert manifest["act"] == {"bits": 8, "range": "learned", "freeze_bn_epochs": None, "scale_format": "float",
                               "mixed_precision": False, "residual_conv": "quantized"}
    assert manifest["scheme"]["weight_bits"] == 8
    state = load_file(str(trained / "checkpoint.safetensors"))
    _, qat = RunDir(trained).load_qat()
    scales = {f"act_quant.{p.name}.log2_scale" for p in act_points(qat)}
    assert scales <= set(state) and len(scales) == len(act_points(qat)) > 20
    # calibrated, then trained: no scale is left at its initial 2^0
    assert all(float(state[k]) != 0.0 for k in scales)
    # the optimizer trains the scales, without weight decay
    opt = build_optimizer(qat, "adamw", lr=1e-3, weight_decay=0.05)
    ids = {id(q.log2_scale) for q in quantizers(qat).values()}
    groups = [g for g in opt.param_groups if ids & {id(p) for p in g["params"]}]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0 and ids <= {id(p) for p in groups[0]["params"]}
    # model.onnx is the float network: the same weights as the QAT model's layers
    _, plain, _ = RunDir(trained).load()
    torch.testing.assert_close(plain.state_dict()["layer1.0.bn1.running_var"],
                               state["qlayers.layer1_0_conv1.bn.running_var"], rtol=0, atol=0)


def test_activation_diagnostics(trained):
    records = [json.loads(line) for line in (trained / "dynamics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    _, qat = RunDir(trained).load_qat()
    for r in records:
        acts = r["activations"]
        assert list(acts) == [p.name for p in act_points(qat)]
        assert all(v["scale"] > 0 and 0 <= v["clipped"] < 0.5 and v["sqnr_db"] > 10 for v in acts.values())


def _scale_one_activation(path: Path, factor: float) -> str:
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.name.startswith("Q_")][5]
    s = inits[q.input[1]]
    s.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(s) * np.float32(factor), s.name))
    onnx.save(model, str(path))
    return q.name


def test_export_and_verify_lossless_activations(trained):
    assert cli("export", trained, "--precision", "int4").exit_code == 2  # trained 8-bit weights
    r = cli("export", trained, "--precision", "int8", "--act-bits", "4")
    assert r.exit_code == 2 and "8-bit activations" in r.output
    r = cli("export", trained, "--precision", "int8")
    assert r.exit_code == 0, r.output
    entry = json.loads((trained / "report.json").read_text())["quantized"]["int8"]
    assert entry["contract"] == "lossless-activations" and entry["calibration"] is None
    r = cli("verify", trained, "--limit", "16")  # model.onnx (float network, fp32 contract) and model.int8.onnx
    assert r.exit_code == 0, r.output
    res = json.loads((trained / "report.json").read_text())["verify"]["quantized"]["int8"]
    assert res["passed"] and res["contract"] == "lossless-activations"
    assert res["inputs"].startswith("16 images from synthetic")  # the run's data, --limit images
    assert set(res["ties"]["on"]) == set(entry["points"])
    name = _scale_one_activation(trained / "model.int8.onnx", 1.01)
    r = cli("verify", trained, "--precision", "int8", "--limit", "16")
    assert r.exit_code == 3 and "model.int8.onnx" in r.output  # the recorded sha256 catches it first
    # re-record the tampered file's hash: the contract itself must catch the changed scale
    from wnconvert.convert.artifacts import sha256
    manifest = json.loads((trained / "manifest.json").read_text())
    manifest["artifacts"]["model.int8.onnx"] = sha256(trained / "model.int8.onnx")
    (trained / "manifest.json").write_text(json.dumps(manifest))
    r = cli("verify", trained, "--precision", "int8", "--limit", "16")
    assert r.exit_code == 3, r.output
    res = json.loads((trained / "report.json").read_text())["verify"]["quantized"]["int8"]
    assert not res["passed"] and any(name[2:] in f for f in res["failures"]), (name, res["failures"])


def test_resume_is_exact(trained, tmp_path, monkeypatch):
    """Ctrl-C as epoch 2 starts, --resume: the same checkpoint as the uninterrupted run."""
    b = interrupt_and_resume(monkeypatch, act_run, tmp_path / "b")
    a = load_file(str(trained / "checkpoint.safetensors"))
    assert_same_tensors(a, b)
    assert bool(a["qlayers.conv1.bn_frozen"]) and any(k.startswith("act_quant.") for k in a)


@pytest.mark.parametrize("option", [["--act-range", "frozen"], ["--mixed-precision"]])
def test_act_options_need_act_bits(tmp_path, option):
    r = cli("finetune", "resnet18", *option, "--out", tmp_path / "run")
    assert r.exit_code == 2 and "--act-bits runs only" in r.output
    assert not (tmp_path / "run").exists()


def test_openvino_target_notes_the_fused_add(trained):
    """The trained file goes to OpenVINO as trained; the record says where OpenVINO departs from it."""
    for target, noted in (("openvino", True), ("ort-cpu", False)):
        r = cli("export", trained, "--precision", "int8", "--target", target)
        assert r.exit_code == 0, r.output
        record = json.loads((trained / "report.json").read_text())["targets"]["model.int8.onnx"]
        assert record["name"] == target and ("skips the requantization" in record.get("note", "")) == noted
