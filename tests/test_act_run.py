"""``finetune --act-bits``: a run trained with activation quantization, exported with its trained
scales and verified under the lossless-activations contract (models/train/act_run.py, act_files.py)."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import SYNTHETIC_32PX, assert_same_tensors, interrupt_and_resume
from onnx import numpy_helper
from safetensors.torch import load_file
from typer.testing import CliRunner

from wnconvert.cli.main import app
from wnconvert.convert.actquant import act_points, quantizers
from wnconvert.models.run.rundir import RunDir
from wnconvert.models.train.optim import build_optimizer

TINY = [*SYNTHETIC_32PX, "--batch-size", "32", "--samples", "2"]


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
                               "mixed_precision": False, "residual_conv": "quantized", "rounding": "onnx"}
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


def _rerecord(run: Path, name: str) -> None:
    from wnconvert.convert.artifacts import sha256
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["artifacts"][name] = sha256(run / name)
    (run / "manifest.json").write_text(json.dumps(manifest))


def _logits_dq(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if "logits" in n.output)


def _scale_logits(model: onnx.ModelProto) -> None:
    """A Mul by 1.01 after the last DequantizeLinear (issue 22, item 5)."""
    dq = _logits_dq(model)
    dq.output[0] = "logits_pre"
    model.graph.initializer.append(numpy_helper.from_array(np.array(1.01, np.float32), "tamper_c"))
    model.graph.node.append(onnx.helper.make_node("Mul", ["logits_pre", "tamper_c"], ["logits"], name="tamper_mul"))


def _shift_logits(model: onnx.ModelProto) -> None:
    """The logits' DequantizeLinear zero point raised by 3 (issue 22, item 5)."""
    zp = next(i for i in model.graph.initializer if i.name == _logits_dq(model).input[2])
    arr = numpy_helper.to_array(zp)
    zp.CopyFrom(numpy_helper.from_array((arr.astype(np.int64) + 3).astype(arr.dtype), zp.name))


@pytest.mark.parametrize("tamper, words", [(None, None), (_scale_logits, "unexpected Mul 'tamper_mul'"),
                                           (_shift_logits, "after its last quantization point"),
                                           ("truncate", "is not a readable ONNX file")])
def test_contract_sees_the_logits(trained, tamper, words):
    """Issue 22, items 0, 2 and 5: the untouched file passes with its per-image tie bound in
    report.json; a change after the last quantization point, or a truncated file (hashes
    re-recorded each time), fails with exit 3 in one line naming it, never 70."""
    path = trained / "model.int8.onnx"
    assert cli("export", trained, "--precision", "int8").exit_code == 0
    if tamper == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 3])
    elif tamper is not None:
        model = onnx.load(str(path))
        tamper(model)
        onnx.save(model, str(path))
    _rerecord(trained, path.name)
    r = cli("verify", trained, "--precision", "int8", "--limit", "16")
    if tamper is None:
        assert r.exit_code == 0, r.output
        res = json.loads((trained / "report.json").read_text())["verify"]["quantized"]["int8"]
        assert res["classifier"] == {"layer": "fc", "input_point": res["classifier"]["input_point"],
                                     "output_point": "fc"}
        for level in res["levels"].values():
            logits = level["logits"]
            assert len(logits["bound"]["per_image"]) == 16 and min(logits["bound"]["per_image"]) >= 0
            assert logits["after_last_point"]["images_beyond"] == 0 and logits["bound"]["images_beyond"] == 0
            assert logits["compared"] > 0 and logits["disagree"] == 0
        return
    assert r.exit_code == 3, r.output
    assert words in r.output and "internal error" not in r.output and "Traceback" not in r.output


def test_recorded_top1_is_the_checkpoints_own(trained):
    """Issue 22, item 0b: the final validation top-1 a run records is what ``eval RUN`` measures
    on the same images; equal logits (a low-bit logit grid has many) rank by class index in both."""
    final = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()
             if '"val_top1"' in line][-1]
    r = cli("eval", trained, "--data", "synthetic:10", "--limit", "32", "--json")
    assert r.exit_code == 0, r.output
    measured = json.loads(r.output[r.output.index("{"):])
    assert measured["images"] == 32 and measured["top1"] == final["val_top1"] and measured["top5"] == final["val_top5"]


def test_validation_ranks_equal_logits_like_eval():
    from torch.utils.data import DataLoader, TensorDataset

    from wnconvert.convert.metrics import topk_correct
    from wnconvert.models.train.batches import evaluate_loader

    tied = torch.tensor([[0.5] * 10, [1.0, 3.0, 3.0] + [0.0] * 7, [3.0] * 9 + [1.0]])
    labels = torch.tensor([0, 1, 0])

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return tied[x[:, 0].long()]

    loader = DataLoader(TensorDataset(torch.arange(3.0)[:, None], labels), batch_size=3)
    res = evaluate_loader(Fixed(), Fixed(), loader, torch.device("cpu"), False, False)
    top1, top5 = topk_correct(tied.numpy(), labels.numpy())
    assert res["val_top1"] == top1 / 3 == 1.0 and res["val_top5"] == top5 / 3


def test_verify_shows_its_stages_on_a_terminal(trained):
    """Issue 22, item 9: a long verify tells a terminal what it is doing; a pipe gets nothing."""
    import io

    from rich.console import Console

    from wnconvert.models.run.run_verify import VerifyRequest, verify_run
    from wnconvert.models.run.verify_progress import VerifyProgress

    assert cli("export", trained, "--precision", "int8").exit_code == 0  # an earlier test truncated it
    screen, pipe = io.StringIO(), io.StringIO()
    with VerifyProgress(Console(file=screen, force_terminal=True, width=200)) as shown, \
            VerifyProgress(Console(file=pipe, force_terminal=False)) as hidden:
        assert verify_run(trained, VerifyRequest(precision="int8", limit=4), shown).passed
        hidden.stage("anything")
    assert shown.stages[0] == "checking the artifacts' sha256"
    assert any("model.int8.onnx" in s and "optimizations on" in s for s in shown.stages), shown.stages
    assert "verify:" in screen.getvalue() and pipe.getvalue() == ""
