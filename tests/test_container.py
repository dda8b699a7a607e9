"""``export --precision int4 --container int4|int8``: 4-bit values in INT4 tensors or in int8 ones
(convert/quantize/container.py), so that a W4A8 file runs onnxruntime's int8 kernels."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from test_act_run import TINY, cli

from wnconvert.convert.actquant.layers import QLayer
from wnconvert.convert.quantize.container import (
    GRID_RANGE,
    META_KEY,
    container_record,
    container_violations,
    mark_int8_container,
    to_int8_container,
)
from wnconvert.models.run.rundir import RunDir

LEVELS = {"off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "on": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def _convert_only(out, *extra):
    """resnet18 at 32 px, calibrated on synthetic images, not trained (--epochs 0)."""
    torch.manual_seed(0)
    r = cli("finetune", "resnet18", *TINY, "--limit-train", "16", "--limit-val", "16", "--epochs", "0",
            "--weight-bits", "4", *extra, "--out", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def w4a8(tmp_path_factory):
    """A W4A8 run's file in both containers: model.int4.onnx (the ort-cpu default) and c4.onnx."""
    out = _convert_only(tmp_path_factory.mktemp("container") / "run", "--act-bits", "8", "--no-deploy")
    r = cli("export", out, "--precision", "int4", "--container", "int4")
    assert r.exit_code == 0, r.output
    (out / "model.int4.onnx").rename(out / "c4.onnx")
    report = json.loads((out / "report.json").read_text())
    c4_entry = report["quantized"]["int4"] | {"target": report["targets"]["model.int4.onnx"]}
    r = cli("export", out, "--precision", "int4")  # target ort-cpu: int8 container
    assert r.exit_code == 0 and "4-bit values in int8" in r.output, r.output
    return out, c4_entry


def _ops(path, tmp_path) -> Counter:
    """Op types of onnxruntime's optimized graph of ``path`` (all optimizations)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS["on"]
    opts.optimized_model_filepath = str(tmp_path / f"{path.stem}.opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


def _logits(path, x, level: str) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS[level]
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _weights(path) -> dict[str, onnx.TensorProto]:
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return {n.input[0]: inits[n.input[0]] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0].endswith("_w_q")}


def test_int8_container_runs_int8_kernels_with_the_same_integers(w4a8, tmp_path):
    out, c4_entry = w4a8
    c8, c4 = out / "model.int4.onnx", out / "c4.onnx"
    w8, w4 = _weights(c8), _weights(c4)
    assert set(w8) == set(w4) and len(w8) == 21
    assert {i.data_type for i in w8.values()} == {TensorProto.INT8}
    assert {i.data_type for i in w4.values()} == {TensorProto.INT4}
    for name in w8:  # the same integers, all on the 4-bit grid
        a, b = numpy_helper.to_array(w8[name]), numpy_helper.to_array(w4[name]).astype(np.int8)
        assert np.array_equal(a, b) and np.abs(a).max() <= 7, name
    assert {p.key: p.value for p in onnx.load(str(c8)).metadata_props}[META_KEY] == "-7,7"
    ops8, ops4 = _ops(c8, tmp_path), _ops(c4, tmp_path)
    assert ops8["QLinearConv"] == 20 and ops8["Conv"] + ops8["FusedConv"] == 0, ops8
    assert ops4["QLinearConv"] == 0 and ops4["Conv"] + ops4["FusedConv"] == 20, ops4
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    # optimizations off: bit for bit (on, QLinearConv's requantization may round a tie the other
    # way, as in any int8 file: the lossless-activations contract of verify allows that)
    assert np.array_equal(_logits(c8, x, "off"), _logits(c4, x, "off"))
    report = json.loads((out / "report.json").read_text())
    entry, target = report["quantized"]["int4"], report["targets"]["model.int4.onnx"]
    assert entry["container"] == "int8" and entry["opset"] == 17 and set(entry["weight_types"].values()) == {"INT8"}
    assert target["settings"]["container"] == "int8" and target["overridden"] == []
    assert target["check"]["container"] == {"storage": "int8", "value_bits": 4, "weight_range": [-7, 7],
                                            "violations": []}
    assert c4_entry["container"] == "int4" and c4_entry["opset"] == 21
    assert c4_entry["target"]["overridden"] == ["container"]
    assert c4_entry["target"]["check"]["container"] == {"storage": "int4"}


def test_verify_passes_and_catches_a_weight_outside_the_4bit_range(w4a8, tmp_path):
    out, _ = w4a8
    r = cli("verify", out, "--precision", "int4", "--limit", "4")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "report.json").read_text())["verify"]["quantized"]["int4"]
    assert res["contract"] == "lossless-activations" and res["passed"] and not res["container"]["violations"]
    path = out / "model.int4.onnx"
    original = path.read_bytes()
    model = onnx.load(str(path))
    w = next(i for i in model.graph.initializer if i.name == "layer3_0_conv1_w_q")
    a = numpy_helper.to_array(w).copy()
    a.flat[0] = 8
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    onnx.save(model, str(path))
    run = RunDir(out)
    run.record(run.manifest(), "model.int4.onnx")  # past the hash check: the container check must catch it
    try:
        r = cli("verify", out, "--precision", "int4", "--limit", "2")
        assert r.exit_code == 3, r.output
        assert "layer3_0_conv1_w_q' holds 8" in r.stderr and "[-7, 7]" in r.stderr
        res = json.loads((out / "report.json").read_text())["verify"]["quantized"]["int4"]
        assert not res["passed"] and len(res["container"]["violations"]) == 1
    finally:
        path.write_bytes(original)
        run.record(run.manifest(), "model.int4.onnx")


def test_export_refuses_a_weight_outside_the_4bit_range(w4a8, tmp_path, monkeypatch):
    """The structural check at export: a file whose stored weights leave [-7, 7] exits 3."""
    out = tmp_path / "run"
    shutil.copytree(w4a8[0], out)
    real = QLayer.deployed

    def off_grid(q):
        d = real(q)
        if q.name == "fc":
            d = replace(d, weight_int=d.weight_int.copy())
            d.weight_int[0, 0] = -8
        return d
    monkeypatch.setattr(QLayer, "deployed", off_grid)  # what export_qdq writes of each layer
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    r = cli("export", out, "--precision", "int4", "--container", "int8")
    assert r.exit_code == 3, r.output
    assert "breaks the ort-cpu rules: weight 'fc_w_q' holds -8" in r.stderr and "nothing was written" in r.stderr
    # checked before the file is put in place: the run directory is as it was
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before


@pytest.mark.parametrize("args, message", [
    (["--precision", "int4", "--container", "int5"], "unknown container 'int5'; choose one of: int4, int8"),
    (["--precision", "int8", "--container", "int8"], "--container stores the 4-bit values of int4 files"),
    (["--container", "int4"], "--precision fp32 has none"),
])
def test_bad_container_options(w4a8, args, message):
    out, _ = w4a8
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}
    r = cli("export", out, *args)
    assert r.exit_code == 2 and message in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"} == before  # nothing written


def test_weights_only_keeps_int4_and_ptq_w4a8_gets_the_int8_container(tmp_path):
    out = _convert_only(tmp_path / "run")  # --weight-bits 4, float activations
    assert cli("export", out, "--precision", "int4").exit_code == 0
    assert {i.data_type for i in _weights_only(out)} == {TensorProto.INT4}
    r = cli("export", out, "--precision", "int4", "--container", "int8")
    assert r.exit_code == 0, r.output
    entry = json.loads((out / "report.json").read_text())["quantized"]["int4"]
    assert entry["container"] == "int8" and entry["lossless_check"]["passed"] and entry["lossy_weights"] == 0
    ints = [numpy_helper.to_array(i) for i in _weights_only(out)]
    assert {i.dtype for i in ints} == {np.dtype(np.int8)} and max(int(np.abs(a).max()) for a in ints) == 7
    # calibrated W4A8: the target's int8
    r = cli("export", out, "--precision", "int4", "--act-bits", "8", "--calib-samples", "8")
    assert r.exit_code == 0, r.output
    entry = json.loads((out / "report.json").read_text())["quantized"]["int4"]
    assert entry["container"] == "int8" and entry["target"]["check"]["passed"]
    assert _ops(out / "model.int4.onnx", tmp_path)["QLinearConv"] == 20


def _weights_only(out) -> list[onnx.TensorProto]:
    model = onnx.load(str(out / "model.int4.onnx"))
    names = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [i for i in model.graph.initializer if i.name in names and i.data_type != TensorProto.INT32]


def test_w4a4_po2_in_int8_container_is_bit_exact(tmp_path):
    """4-bit activations in int8 containers (an 8-bit QuantizeLinear, then an integer Clip; the input's too):
    the bit-exact contract (integer reference, onnxruntime off and on) holds as on INT4/UINT4."""
    out = _convert_only(tmp_path / "run", "--act-bits", "4", "--scale-format", "po2", "--no-deploy")
    r = cli("export", out, "--precision", "int4", "--target", "fixed-point", "--container", "int8")
    assert r.exit_code == 0, r.output
    model = onnx.load(str(out / "model.int4.onnx"))
    clips = [n for n in model.graph.node if n.op_type == "Clip" and n.name.startswith("Clip_")]
    entry = json.loads((out / "report.json").read_text())["quantized"]["int4"]
    assert entry["container"] == "int8" and entry["clipped_points"] == entry["points"] == [c.name[5:] for c in clips]
    q_input = next(n for n in model.graph.node if n.output[0] == clips[0].input[0])
    assert q_input.op_type == "QuantizeLinear" and q_input.input[0] == "input"
    assert set(entry["activation_types"].values()) <= {"UINT8", "UINT8+128"}
    r = cli("verify", out, "--precision", "int4", "--limit", "2")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "report.json").read_text())["verify"]["quantized"]["int4"]
    assert res["contract"] == "bit-exact" and res["passed"] and all(c["differ"] == 0 for c in res["layers"])


def _int4_weight_graph(values) -> onnx.ModelProto:
    """x -> Conv(x, DQ(INT4 weight)) with the given weight integers."""
    w = onnx.helper.make_tensor("w_q", TensorProto.INT4, [len(values), 1, 1, 1], values)
    s = numpy_helper.from_array(np.full(len(values), 0.1, np.float32), "w_s")
    nodes = [onnx.helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], axis=0),
             onnx.helper.make_node("Conv", ["x", "w"], ["y"])]
    graph = onnx.helper.make_graph(nodes, "g",
                                   [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                                   [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])], [w, s])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])


def test_retyped_int4_keeps_its_integers_and_range():
    """Post-training int4 (onnxruntime's quantizer uses INT4's [-8, 7]) retyped into int8: marked
    with INT4's range; a grid mark makes the -8 a violation, and an unmarked file is not checked."""
    model = _int4_weight_graph([-8, 7, 0])
    assert container_violations(model) == [] and container_record(model) == {"storage": "int4"}
    assert to_int8_container(model) == 1
    w = next(i for i in model.graph.initializer if i.name == "w_q")
    assert w.data_type == TensorProto.INT8 and numpy_helper.to_array(w).ravel().tolist() == [-8, 7, 0]
    assert container_record(model) == {"storage": "int8", "value_bits": 4, "weight_range": [-8, 7], "violations": []}
    onnx.checker.check_model(model, full_check=True)
    mark_int8_container(model, GRID_RANGE)
    assert container_violations(model) == ["weight 'w_q' holds -8 (1 values) outside the 4-bit range [-7, 7] "
                                           "of its int8 container"]
