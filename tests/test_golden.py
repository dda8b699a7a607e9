"""Golden vectors: exact round trip, the index, and a one-bit weight change caught and named."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from qdq_graphs import QdqBuilder, tiny_cnn

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.golden import golden_for_file, read_golden, write_golden
from wnconvert.convert.intref import compare_runs, run_integer


@pytest.fixture
def cnn_file(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(seed=5).model(), str(path))
    return path


def _images(n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)) * 3


def test_golden_round_trips_exactly(tmp_path, cnn_file):
    run = run_integer(cnn_file, _images())
    index = write_golden(run, tmp_path / "g", "three normal images")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["golden.npz", "index.json"]
    back = read_golden(tmp_path / "g")
    assert back["index"] == index == json.loads((tmp_path / "g" / "index.json").read_text())
    assert list(back["arrays"]) == list(run.tensors)  # graph order, the network input first
    for name, t in run.tensors.items():
        assert back["arrays"][name].dtype == t.values.dtype
        np.testing.assert_array_equal(back["arrays"][name], t.values)
    assert compare_runs(run, back["arrays"]) is None
    assert index["network_input"] == next(iter(run.tensors)) and index["images"] == 3
    conv = next(layer for layer in index["layers"] if layer["op"] == "Conv")
    assert conv["output_scale"] == {"value": 0.125, "log2": -3} and conv["input_scales"][0]["log2"] == -5
    assert conv["weight_scales"]["log2"] == [-5, -6, -7, -5, -6, -7, -5, -6]
    assert conv["shift"] == [7, 8, 9, 7, 8, 9, 7, 8] and conv["integer_only"]
    assert conv["input_zero_points"] == [128] and conv["dtype"] == "uint8"
    assert 0 < conv["max_abs_acc"] <= conv["max_abs_partial"] < 2 ** 24 and not conv["acc_over_2_24"]


def test_one_bit_weight_change_names_the_layer(tmp_path, cnn_file):
    x = _images(4, seed=1)
    golden_for_file(cnn_file, x, tmp_path / "g")
    model = onnx.load(str(cnn_file))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    dq = next(n for n in model.graph.node if n.output[0] == convs[1].input[1])
    init = next(i for i in model.graph.initializer if i.name == dq.input[0])
    w = numpy_helper.to_array(init).copy()
    w.flat[17] ^= 1  # one bit of one weight integer
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    changed = tmp_path / "changed.onnx"
    onnx.save(model, str(changed))
    mismatch = compare_runs(run_integer(changed, x), read_golden(tmp_path / "g")["arrays"])
    q_of_conv2 = next(n.output[0] for n in model.graph.node
                      if n.op_type == "QuantizeLinear" and n.input[0] == convs[1].output[0])
    assert mismatch is not None and mismatch.name == q_of_conv2 and mismatch.op == "Conv"
    assert mismatch.node == convs[1].name and 0 < mismatch.count < mismatch.total
    assert mismatch.max_abs_diff >= 1 and convs[1].name in str(mismatch)


def test_golden_summary_and_fallback_layers(tmp_path, cnn_file):
    summary = golden_for_file(cnn_file, _images(2), tmp_path / "g")
    assert summary["tensors"] == 9 and summary["images"] == 2 and summary["integer_only"]
    assert summary["not_integer_only"] == [] and summary["over_2_24"] == []
    assert summary["reference_ms_per_image"] > 0
    b = QdqBuilder()
    x = b.input([1, 4], 0.1)
    y = b.step("Gemm", [x], 0.3, extra=[b.weight(np.arange(-8, 8).reshape(4, 4), 2.0 ** -6)], transB=1)
    summary = golden_for_file(b.model(), np.ones((1, 4)), tmp_path / "f")
    index = read_golden(tmp_path / "f")["index"]
    layer = index["layers"][1]
    assert summary["not_integer_only"] == [y] and not index["integer_only"]
    assert layer["shift"] is None and layer["output_scale"]["log2"] is None
    assert layer["weight_scales"]["log2"] == [-6] and "not a power of two" in layer["reason"]


def test_unreadable_golden_and_output_paths(tmp_path, cnn_file):
    with pytest.raises(UserInputError, match="index.json is missing"):
        read_golden(tmp_path)
    run = run_integer(cnn_file, _images(1))
    write_golden(run, tmp_path / "g", "one")
    index = json.loads((tmp_path / "g" / "index.json").read_text())
    index["layers"][2]["shape"] = [7]
    (tmp_path / "g" / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserInputError, match="does not hold tensor"):
        read_golden(tmp_path / "g")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserInputError, match="not a directory"):
        write_golden(run, tmp_path / "file", "one")
