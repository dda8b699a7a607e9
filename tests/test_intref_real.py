"""The integer reference on a real QDQ file: the project's own int8 export of a ResNet-18 (float
scales from onnxruntime's calibration, so the requantizations take the visible fallback)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from helpers import randomize
from qdq_graphs import LEVELS

from wnconvert.convert.export import export_onnx
from wnconvert.convert.intref import compare_runs, run_integer
from wnconvert.convert.quantize import QuantOptions, quantize


def _with_every_tensor_as_output(path, run) -> bytes:
    model = onnx.load(str(path))
    known = {o.name for o in model.graph.output}
    for name, t in run.tensors.items():
        if name not in known:
            elem = onnx.TensorProto.UINT8 if t.dtype == "uint8" else onnx.TensorProto.INT8
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return model.SerializeToString()


def test_resnet18_int8_export_runs_in_the_reference(tmp_path):
    torch.manual_seed(0)
    net = randomize(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(6, 3, 32, 32)
    export_onnx(net, x[:1], tmp_path / "model.onnx")
    quantize(tmp_path / "model.onnx", tmp_path / "int8.onnx", QuantOptions("int8"), x.numpy())
    run = run_integer(tmp_path / "int8.onnx", x.numpy())
    ops = {t.op for t in run.tensors.values()}
    assert {"QuantizeLinear", "Conv", "MaxPool", "Add", "GlobalAveragePool", "Gemm"} <= ops
    # float scales: multipliers are not powers of two, except where a tensor keeps its input's scale
    kept = 0
    for t in run.tensors.values():
        if t.kind != "requant":
            continue
        keeps = t.op not in ("Conv", "Gemm") and all(s == t.scale for s in t.input_scales)
        kept += keeps
        assert t.integer_only == keeps and (t.shift == 0 if keeps else "not a power of two" in t.reason), t.name
    assert kept >= 2  # MaxPool, Flatten
    assert not run.integer_only
    # the classifier is one Gemm writing float logits: an int32 accumulator in the reference
    assert [t.op for t in run.tensors.values() if t.kind == "acc"] == ["Gemm"]
    model = _with_every_tensor_as_output(tmp_path / "int8.onnx", run)
    for level in ("off", "on"):
        opts = ort.SessionOptions()
        opts.graph_optimization_level, opts.log_severity_level = LEVELS[level], 3
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        got = dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x.numpy()})))
        assert set(run.tensors) <= set(got)
        diffs = [np.abs(got[n].astype(np.int64) - t.values.astype(np.int64)) for n, t in run.tensors.items()
                 if t.kind != "acc"]  # the float logits: compare_runs below, in units of their scale
        # the fallback emulates onnxruntime's float32 requantization: equal on these images, and
        # in general at most one step apart (a float rounding that lands on a tie)
        assert max(int(d.max()) for d in diffs) <= 1, level
        assert sum(int(np.count_nonzero(d)) for d in diffs) <= 1e-4 * sum(d.size for d in diffs), level
        assert compare_runs(run, got) is None or level == "off", level
