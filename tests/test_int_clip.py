"""4-bit (and 5-7-bit) activations stored in 8 bits keep their grid's range in the quantized domain:
``Q -> integer Clip -> DQ`` (export_qdq). onnxruntime then fuses every conv and add into its integer
kernels, the logits are those of the float-Clip form bit for bit, and the integer reference, the
lossless and the bit-exact checks read the points at the Clip's output."""

from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import randomize
from onnx import TensorProto, numpy_helper
from test_intref_fast import _Net

from wnconvert.convert.actquant import (
    ActQuantConfig,
    calibrate,
    check_bit_exact,
    check_lossless_activations,
    export_qdq,
    freeze_bn,
    prepare_qat,
)
from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.intref import run_integer
from wnconvert.convert.schemes import SchemeConfig

_spec = importlib.util.spec_from_file_location("lowbit_kernels",
                                               Path(__file__).parents[1] / "benchmarks" / "lowbit_kernels.py")
lowbit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lowbit)


def _qat(act_bits: int, po2: bool):
    torch.manual_seed(act_bits)
    model = randomize(_Net(), seed=act_bits)
    apply_scheme(model, SchemeConfig("channel-max", weight_bits=4))
    q = prepare_qat(model, ActQuantConfig(act_bits, scale_format="po2" if po2 else "float"))
    calibrate(q, [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))])
    freeze_bn(q)
    return q


def _images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def _ort(path, optimized: bool, save=None):
    return lowbit.ort_session(path, 0, optimized, save)


@pytest.mark.parametrize("act_bits", [4, 6])
def test_low_bit_points_clip_integers_and_fuse_into_integer_kernels(tmp_path, act_bits):
    q = _qat(act_bits, po2=False)
    path = tmp_path / "w4.onnx"
    info = export_qdq(q, path, example_shape=(1, 3, 16, 16), container="int8")
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {n.output[0]: n for n in model.graph.node}
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert info.clipped_points == info.points and len(clips) == len(info.points) >= 5
    for c in clips:  # every Clip reads a QuantizeLinear's integers; its bounds are integers of that type
        qn = producer[c.input[0]]
        assert qn.op_type == "QuantizeLinear" and c.output[0] == f"{qn.doc_string}_q"
        zp = int(numpy_helper.to_array(inits[qn.input[2]]))
        lo, hi = (numpy_helper.to_array(inits[c.input[i]]) for i in (1, 2))
        assert lo.dtype == hi.dtype == np.uint8 and int(hi) - int(lo) == 2 ** act_bits - 1
        assert int(lo) - zp in (0, -(2 ** (act_bits - 1)))
    # no float Clip before a QuantizeLinear: onnxruntime fuses every conv and add
    ops = collections.Counter(n.op_type for n in onnx.load(str(_fused(path, tmp_path))).graph.node)
    assert ops["QLinearConv"] == 3 and ops["QLinearAdd"] == 1 and not ops["FusedConv"] + ops["Conv"]
    # the float-Clip form (the export before): the same logits bit for bit, and it did not fuse
    old = tmp_path / "float_clip.onnx"
    assert lowbit.float_clip_form(path, old) == len(clips)
    assert collections.Counter(n.op_type for n in onnx.load(str(_fused(old, tmp_path))).graph.node)["QLinearConv"] == 0
    x = _images(16).numpy()
    for optimized in (False, True):
        a, b = (_ort(p, optimized).run(None, {"input": x})[0] for p in (path, old))
        assert np.array_equal(a, b) or optimized   # on: fused kernels may round a tie the other way
    if act_bits == 4:
        res = check_lossless_activations(q, path, _images(8))
        assert res["passed"], res["failures"]


def _fused(path, tmp_path):
    save = tmp_path / f"{path.stem}_opt.onnx"
    _ort(path, True, save)
    return save


@pytest.fixture(scope="module")
def po2_w4a4(tmp_path_factory):
    q = _qat(4, po2=True)
    path = tmp_path_factory.mktemp("intclip") / "w4a4.onnx"
    export_qdq(q, path, example_shape=(1, 3, 16, 16), container="int8")
    return q, path


def test_po2_w4a4_with_integer_clips_is_bit_exact_and_read_by_the_reference(po2_w4a4):
    q, path = po2_w4a4
    rep = check_bit_exact(q, path, _images(8))
    assert rep.passed, rep.failures
    run = run_integer(path, _images(4).numpy())
    points = [p for p in (n.doc_string for n in onnx.load(str(path)).graph.node if n.op_type == "Clip")]
    for p in points:   # the reference's tensor of each point is the Clip's output, within the 4-bit range
        t = run.tensors[f"{p}_q"]
        k = t.values.astype(np.int64) - t.zero_point
        assert k.min() >= (-8 if k.min() < 0 else 0) and k.max() <= (7 if t.zero_point else 15)
        assert f"{p}_q8" not in run.tensors
    assert run.tensors[f"{points[0]}_q"].kind == "input"
    assert any(int(t.values.max()) - t.zero_point == 15 for t in run.tensors.values() if t.kind == "requant")


def test_reference_refuses_an_integer_clip_that_is_not_a_quantizelinear_s_sole_reader(po2_w4a4):
    model = onnx.load(str(po2_w4a4[1]))
    clip = next(n for n in model.graph.node if n.op_type == "Clip")
    model.graph.output.append(onnx.helper.make_tensor_value_info(clip.input[0], TensorProto.UINT8, None))
    with pytest.raises(UserInputError, match="sole reader"):
        run_integer(model, _images(1).numpy())
