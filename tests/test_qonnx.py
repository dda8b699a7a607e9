"""QONNX export (``export RUN --target qonnx``) and its check with qonnx's real executor:
the file's ``Quant`` nodes hold the trained widths and scales, and qonnx's integers at every point
equal the QDQ file's in onnxruntime (off and on) and the integer reference's."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

pytest.importorskip("qonnx")

from helpers import SYNTHETIC_32PX

from wnconvert.cli.main import app
from wnconvert.convert.actquant import (
    ActQuantConfig,
    act_points,
    calibrate,
    export_qdq,
    prepare_qat,
)
from wnconvert.convert.actquant.export_qonnx import (
    QONNX_DOMAIN,
    export_qonnx,
    quant_nodes,
)
from wnconvert.convert.actquant.qonnx_check import check_qonnx
from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.models.run.rundir import RunDir

TINY = [*SYNTHETIC_32PX, "--samples", "2", "--limit-train", "8", "--limit-val", "8",
        "--batch-size", "8"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


class TinyNet(nn.Module):
    """conv/BN/ReLU, max pooling, a residual add, global average pooling, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.gap, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        y = self.pool(torch.relu(self.bn1(self.conv1(x))))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(torch.flatten(self.gap(y), 1))


def _tiny_files(tmp_path, wbits, abits, po2, scheme="channel-max"):
    torch.manual_seed(0)
    m = TinyNet()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    apply_scheme(m, SchemeConfig(scheme, weight_bits=wbits))
    q = prepare_qat(m, ActQuantConfig(abits, scale_format="po2" if po2 else "float"))
    calibrate(q, [torch.randn(16, 3, 16, 16)])
    q.eval()
    export_qdq(q, tmp_path / "m.onnx", example_shape=(1, 3, 16, 16))
    info = export_qonnx(q, tmp_path / "m.qonnx.onnx", example_shape=(1, 3, 16, 16))
    return q, info


@pytest.mark.parametrize("wbits,abits,po2", [(2, 2, True), (4, 4, True), (8, 8, True), (4, 4, False), (3, 5, False)])
def test_qonnx_executor_equals_the_qdq_file(tmp_path, wbits, abits, po2):
    q, info = _tiny_files(tmp_path, wbits, abits, po2)
    x = torch.randn(24, 3, 16, 16) * 1.5
    res = check_qonnx(q, tmp_path / "m.qonnx.onnx", tmp_path / "m.onnx", x, po2=po2)
    assert res["passed"], res["failures"]
    assert res["mode"] == ("bit-exact" if po2 else "lossless-activations")
    assert res["elements"] > 0 and res["equal"]["ort_off"] == res["elements"]
    if po2:
        assert res["equal"] == dict.fromkeys(("ort_off", "ort_on", "intref"), res["elements"])
        assert info.to_dict()["power_of_two"]
    assert [p["point"] for p in res["points"]] == [p.name for p in act_points(q)]
    assert set(info.to_dict()["activation_bits"].values()) == {abits}


def _set_init(model, name, value):
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.asarray(value, np.float32), name))
            return
    raise KeyError(name)


@pytest.mark.parametrize("po2", [True, False])
def test_a_changed_scale_or_width_fails_at_its_point(tmp_path, po2):
    """A 1 % activation scale change (float runs) or a narrower bit width fails, naming the point."""
    q, info = _tiny_files(tmp_path, 4, 4, po2)
    model = onnx.load(str(tmp_path / "m.qonnx.onnx"))
    node = next(n for n in quant_nodes(model) if n.name == f"Quant_{info.points[2]}")
    if po2:
        _set_init(model, node.input[3], 2.0)  # 4 -> 2 bits
    else:
        s = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[1]))
        _set_init(model, node.input[1], s * 1.01)
    onnx.save(model, str(tmp_path / "bad.onnx"))
    res = check_qonnx(q, tmp_path / "bad.onnx", tmp_path / "m.onnx", torch.randn(16, 3, 16, 16) * 2, po2=po2)
    assert not res["passed"]
    assert res["failures"][0].startswith(f"first difference at point {info.points[2]} (Quant node {node.name!r})")


# -- through the command line ------------------------------------------------------------------

@pytest.fixture(scope="module")
def w4a4(tmp_path_factory):
    """A W4A4 po2 ResNet-18 at 32 px, one step on 8 synthetic images, exported --target qonnx."""
    out = tmp_path_factory.mktemp("qonnx") / "run"
    torch.manual_seed(0)
    r = cli("finetune", "resnet18", *TINY, "--epochs", "1", "--weight-bits", "4", "--act-bits", "4",
            "--scale-format", "po2", "--no-export", "--out", out)
    assert r.exit_code == 0, r.output
    r = cli("export", out, "--target", "qonnx")
    assert r.exit_code == 0, r.output
    assert "QONNX, W4A4" in r.output
    r = cli("export", out, "--precision", "int4")  # the QDQ file verify compares with (else a temporary one)
    assert r.exit_code == 0, r.output
    return out


def test_qonnx_file_structure(w4a4):
    model = onnx.load(str(w4a4 / "model.qonnx.onnx"))
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17), (QONNX_DOMAIN, 1)}
    types = {n.op_type for n in model.graph.node}
    assert not types & {"QuantizeLinear", "DequantizeLinear", "BatchNormalization", "Clip"}, types
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quants = quant_nodes(model)
    assert quants and all(n.domain == QONNX_DOMAIN for n in quants)
    weights = [n for n in quants if n.input[0] in inits]
    acts = [n for n in quants if n.input[0] not in inits]
    attrs = lambda n: {a.name: helper.get_attribute_value(a) for a in n.attribute}
    assert len(weights) == 21 and len(acts) == len(json.loads((w4a4 / "report.json").read_text())
                                                   ["quantized"]["qonnx"]["points"])
    for n in weights:
        w, s = inits[n.input[0]], inits[n.input[1]]
        assert attrs(n) == {"signed": 1, "narrow": 1, "rounding_mode": b"ROUND"}
        channels = (w.shape[1],) if w.ndim == 2 else (w.shape[0], 1, 1, 1)  # MatMul weights: (in, out)
        assert inits[n.input[3]] == 4 and s.shape == channels
        k = w / s
        assert np.array_equal(k, np.round(k)) and np.abs(k).max() <= 7
    signed = {n.doc_string: attrs(n)["signed"] for n in acts}
    assert signed["input"] == 1 and signed["layer1_0_conv1"] == 0 and signed["layer1_0_conv2"] == 1  # ReLU or not
    for n in quants:
        s = inits[n.input[1]].astype(np.float32).reshape(-1)
        assert np.all((s.view(np.uint32) & 0x7FFFFF) == 0), n.name  # po2 run: powers of two
        assert not inits[n.input[2]].any() and inits[n.input[3]] == 4
    assert RunDir(w4a4).manifest().targets["model.qonnx.onnx"]["target"] == "qonnx"


def test_verify_and_golden_run_qonnx_executor(w4a4, tmp_path):
    r = cli("verify", w4a4, "--onnx", w4a4 / "model.qonnx.onnx", "--limit", "4", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)["quantized"]["qonnx"]
    assert res["passed"] and res["mode"] == "bit-exact" and res["images"] == 4
    assert res["equal"] == dict.fromkeys(("ort_off", "ort_on", "intref"), res["elements"])
    assert res["qdq_file"] == "model.int4.onnx"
    r = cli("golden", w4a4, "--precision", "qonnx", "--count", "2", "--out", tmp_path / "g", "--json")
    assert r.exit_code == 0, r.output
    q = json.loads(r.output)["qonnx"]
    assert q["mode"] == "bit-exact" and q["equal"] == dict.fromkeys(("ort_off", "ort_on", "intref"), q["elements"])
    assert (tmp_path / "g" / "golden.npz").is_file()


def test_crafted_bit_width_exits_3_naming_the_point(w4a4, tmp_path):
    """A bit width changed in the file and the hashes re-recorded: verify exits 3 naming the point
    (golden runs the same check; its refusal is tested at the library level below)."""
    run = tmp_path / "run"
    shutil.copytree(w4a4, run)
    path = run / "model.qonnx.onnx"
    model = onnx.load(str(path))
    node = next(n for n in quant_nodes(model) if n.name == "Quant_layer2_0_conv1")
    _set_init(model, node.input[3], 2.0)
    onnx.save(model, str(path))
    r = cli("verify", run, "--onnx", path, "--limit", "4")
    assert r.exit_code == 3 and "does not match the sha256" in r.output, r.output   # hashes first
    rd = RunDir(run)
    m = rd.manifest()
    rd.record(m, "model.qonnx.onnx")
    r = cli("verify", run, "--onnx", path, "--limit", "4")
    assert r.exit_code == 3, r.output
    assert "first difference at point layer2_0_conv1 (Quant node 'Quant_layer2_0_conv1')" in r.output
    r = cli("verify", run, "--precision", "qonnx", "--limit", "4")  # the run's own file, reached by --precision
    assert r.exit_code == 3, r.output
    assert "first difference at point layer2_0_conv1 (Quant node 'Quant_layer2_0_conv1')" in r.output


def test_verify_run_reaches_the_qonnx_file(w4a4, tmp_path):
    """``verify RUN --precision qonnx`` checks model.qonnx.onnx alone; plain ``verify RUN`` of a run
    without model.onnx (trained --no-export, then exported) checks the files it has, QONNX included."""
    r = cli("verify", w4a4, "--precision", "qonnx", "--limit", "2", "--json")
    assert r.exit_code == 0, r.output
    q = json.loads(r.output)["quantized"]
    assert list(q) == ["qonnx"] and q["qonnx"]["passed"], q.keys()
    assert q["qonnx"]["mode"] == "bit-exact" and q["qonnx"]["images"] == 2
    assert q["qonnx"]["equal"] == dict.fromkeys(("ort_off", "ort_on", "intref"), q["qonnx"]["elements"])
    assert not (w4a4 / "model.onnx").exists()
    r = cli("verify", w4a4, "--limit", "2", "--json")
    assert r.exit_code == 0, r.output
    q = json.loads(r.output)["quantized"]
    assert set(q) == {"int4", "qonnx"} and all(v["passed"] for v in q.values())
    # refused in one line, exit 2, before anything loads: a run without the file, or without any deployed file
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(w4a4 / "manifest.json", bare / "manifest.json")
    r = cli("verify", bare, "--precision", "qonnx")
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"wnconvert: error: {bare}/model.qonnx.onnx does not exist; run `wnconvert export {bare} --target qonnx` "
        "first"], r.output
    r = cli("verify", bare)
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"wnconvert: error: {bare}/model.onnx does not exist; run `wnconvert export {bare}` first"], r.output


def test_target_qonnx_refuses_in_one_line_before_writing(w4a4, tmp_path):
    run = tmp_path / "plain"
    r = cli("finetune", "resnet18", "--weights", "none", "--image-size", "32", "--num-classes", "10",
            "--workers", "0", "--device", "cpu", "--epochs", "0", "--no-export", "--out", run)
    assert r.exit_code == 0, r.output
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    r = CliRunner().invoke(app, ["export", str(run), "--target", "qonnx"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [("wnconvert: error: --target qonnx writes the trained integer network "
                                              "of an --act-bits run; this run was trained without --act-bits "
                                              "(finetune --weight-bits B --act-bits A)")]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    r = cli("export", w4a4, "--target", "qonnx", "--precision", "int8")
    assert r.exit_code == 2 and "--precision does not apply" in r.output, r.output


def test_golden_refuses_a_file_qonnx_disagrees_with(w4a4, tmp_path, monkeypatch):
    """golden --precision qonnx writes nothing when the check fails (the check itself stubbed to fail:
    its real failures are tested above)."""
    from wnconvert.convert.errors import ParityError
    from wnconvert.models.run import qonnx_run

    monkeypatch.setattr(qonnx_run, "check_qonnx", lambda *a, **k: {"passed": False, "failures": ["first difference at "
                                                                                                 "point X"]})
    with pytest.raises(ParityError, match="first difference at point X"):
        qonnx_run.golden_qonnx(w4a4, w4a4 / "model.qonnx.onnx", np.zeros((1, 3, 32, 32), np.float32),
                               tmp_path / "g", "zeros")
    assert not (tmp_path / "g").exists()
