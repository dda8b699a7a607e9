"""fp16 / int8 / int4 ONNX from a run's model.onnx, their verification, `eval`, and bad inputs."""

import json

import numpy as np
import onnx
import pytest
from helpers import scale_first_dequantized_weight
from onnx import TensorProto, numpy_helper
from test_data import write_fashion
from typer.testing import CliRunner

from wnconvert.cli.main import app
from wnconvert.convert.metrics import compare_logits
from wnconvert.convert.quant_check import QuantThresholds
from wnconvert.convert.runtime import run_onnx
from wnconvert.models.run.run_export import export_precision
from wnconvert.models.run.run_verify import VerifyRequest, verify_run
from wnconvert.models.run.rundir import RunDir

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _finetune(out, scheme, *extra):
    r = invoke("finetune", "resnet18", "--weights", "none", "--num-classes", 10, "--epochs", 0,
               "--image-size", 32, "--scheme", scheme, "--samples", 4, "--out", out, *extra)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    root = tmp_path_factory.mktemp("fm") / "fm"
    write_fashion(root, n_train=20, n_test=40)
    return f"fashion-mnist:{root}"


@pytest.fixture(scope="module")
def run_lm4(tmp_path_factory):
    return _finetune(tmp_path_factory.mktemp("lm") / "run", "layer-max", "--weight-bits", 4)


@pytest.fixture(scope="module")
def run_cm4(tmp_path_factory):
    return _finetune(tmp_path_factory.mktemp("cm") / "run", "channel-max", "--weight-bits", 4)


def _dq_weights(path):
    """(int initializer, scale, zero point, axis) of every DequantizeLinear fed by initializers."""
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    out = []
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            axis = next((a.i for a in n.attribute if a.name == "axis"), None)
            zp = inits[n.input[2]] if len(n.input) > 2 else None
            out.append((inits[n.input[0]], numpy_helper.to_array(inits[n.input[1]]), zp, axis))
    return m, out


def _fp32_weights(path):
    m = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def _report(run):
    return json.loads((run / "report.json").read_text())


@pytest.mark.parametrize("which", ["lm", "cm"])
def test_int4_weights_only_is_lossless(which, run_lm4, run_cm4):
    run = run_lm4 if which == "lm" else run_cm4
    export_precision(run, "int4")
    path = run / "model.int4.onnx"
    model, dqs = _dq_weights(path)
    assert any(o.version == 21 for o in model.opset_import if o.domain in ("", "ai.onnx"))
    fp32 = _fp32_weights(run / "model.onnx")
    conv_weights = [n.input[1] for n in onnx.load(str(run / "model.onnx")).graph.node
                    if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(dqs) == len(conv_weights) > 10
    for q_init, scale, zp, axis in dqs:
        assert q_init.data_type == TensorProto.INT4
        assert np.abs(numpy_helper.to_array(q_init).astype(np.int64)).max() <= 7
        assert zp is not None and not numpy_helper.to_array(zp).astype(np.int64).any()
        assert np.all(scale == np.float32(1 / 7))
        if which == "lm":
            assert scale.ndim == 0
        else:
            assert scale.ndim == 1 and axis in (0, 1) and len(scale) == numpy_helper.to_array(q_init).shape[axis]
        w = fp32[q_init.name[:-len("_quantized")]].astype(np.float64)
        q = numpy_helper.to_array(q_init).astype(np.int64)
        assert np.array_equal(q, np.round(w * 7))
        assert np.abs(w * 7 - q).max() <= 1e-5  # the fp32 weights are on the grid
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    ref, out = run_onnx(run / "model.onnx", x), run_onnx(path, x)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    entry = _report(run)["quantized"]["int4"]
    assert entry["lossless_check"]["passed"] and entry["exact_weights"] == len(dqs)
    assert entry["vs_fp32"]["top1_agreement"] == 1.0


def test_int8_static_qdq(run_cm4, fashion):
    r = invoke("export", run_cm4, "--precision", "int8", "--data", fashion, "--calib-samples", 16,
               "--calibrate-method", "minmax", "--json")
    assert r.exit_code == 0, r.output
    path = run_cm4 / "model.int8.onnx"
    model, dqs = _dq_weights(path)
    kinds = {TensorProto.DataType.Name(q.data_type) for q, *_ in dqs}
    assert "INT8" in kinds
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # every conv weight comes through a DequantizeLinear of an int8 initializer
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(n.input[1] in dq_out for n in convs)
    entry = _report(run_cm4)["quantized"]["int8"]
    assert entry["activations"] == "uint8"
    # BatchNorm folded into the Convs, and the trained 4-bit grid kept: each channel's integers
    # are the grid's, the folded BatchNorm factor went into its scale
    assert entry["fused"] is True and "BatchNormalization" not in ops
    weights = [(q, sc, ax) for q, sc, _, ax in dqs if q.data_type == TensorProto.INT8]
    assert entry["exact_weights"] == len(weights) == 21 and entry["lossy_weights"] == 0
    for q, scale, axis in weights:
        k = numpy_helper.to_array(q).astype(np.int64)
        assert np.abs(k).max() <= 7 and scale.ndim == 1 and len(scale) == k.shape[axis]
    # each int32 bias keeps the scale input_scale * weight_scale that onnxruntime's QLinearConv needs
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for n in convs:
        x_s, w_s, b_s = (inits[dq[n.input[i]].input[1]] for i in range(3))
        np.testing.assert_allclose(b_s, (x_s * w_s).astype(np.float32), rtol=1e-6)
    assert entry["calibration"].startswith("16 train images") and entry["inputs"].startswith("16 validation")
    assert 0.0 <= entry["vs_fp32"]["top1_agreement"] <= 1.0
    assert entry["vs_fp32"]["cosine_mean"] > 0.9 and np.isfinite(entry["vs_fp32"]["sqnr_db"])
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert run_onnx(path, x).shape == (2, 10)


@pytest.fixture(scope="module")
def run_plain(tmp_path_factory):
    """A layer-max run without a trained grid, BatchNorm kept apart in model.onnx."""
    return _finetune(tmp_path_factory.mktemp("plain") / "run", "layer-max")


@pytest.mark.parametrize("act_type", ["uint8", "int8"])
def test_int8_folds_batchnorm_into_quantized_convs(run_plain, fashion, act_type):
    """Without a trained grid, BatchNorm and the scales are folded into the Convs before
    quantizing: every Conv reads quantized input and weights and writes a quantized output."""
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(run_plain / "model.onnx")).graph.node)
    r = invoke("export", run_plain, "--precision", "int8", "--data", fashion, "--calib-samples", 16,
               "--act-type", act_type)
    assert r.exit_code == 0, r.output
    model = onnx.load(str(run_plain / "model.int8.onnx"))
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 20 and not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    for n in convs:
        assert producer[n.input[0]] == producer[n.input[1]] == "DequantizeLinear"
        assert consumers[n.output[0]] == ["QuantizeLinear"]
    inits = {i.name: i for i in model.graph.initializer}
    zps = {inits[n.input[2]].data_type for n in model.graph.node
           if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}
    assert zps == {TensorProto.UINT8 if act_type == "uint8" else TensorProto.INT8}
    entry = _report(run_plain)["quantized"]["int8"]
    assert entry["fused"] is True and entry["activations"] == act_type
    assert entry["vs_fp32"]["cosine_mean"] > 0.9


def test_folded_grid_stays_exact_per_channel():
    """A [-1, 1] grid times a per-channel factor (BatchNorm folded in) is recovered exactly; a
    weight off any coarse grid is not claimed."""
    from wnconvert.convert.quantize.grid import grid_integers as _grid_integers

    rng = np.random.default_rng(0)
    k = rng.integers(-7, 8, size=(16, 9))
    k[:, 0] = 5  # a channel's largest level need not be 7
    for f in (1 / 7, 0.0371, 3.5):
        out = _grid_integers((k * f).astype(np.float32).astype(np.float64), L=7, qmax=127)
        assert out is not None and np.array_equal(out[0] * np.sign(f), k)
        assert out[1] == pytest.approx(f, rel=1e-6)
    assert _grid_integers(np.full(4, 3 / 7), 7, 7)[1] == 1 / 7  # the trained step, kept exact
    assert _grid_integers(rng.standard_normal(64), 7, 127) is None


def test_fp16_runs(run_lm4):
    r = invoke("export", run_lm4, "--precision", "fp16")
    assert r.exit_code == 0, r.output
    path = run_lm4 / "model.fp16.onnx"
    m = onnx.load(str(path))
    assert any(i.data_type == TensorProto.FLOAT16 for i in m.graph.initializer)
    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype(np.float32)
    c = compare_logits(run_onnx(run_lm4 / "model.onnx", x), run_onnx(path, x))
    assert c["cosine_min"] > 0.999
    assert "fp16" in _report(run_lm4)["quantized"]


def test_eval_onnx_and_checkpoint(run_lm4, fashion):
    r = invoke("eval", run_lm4 / "model.onnx", "--data", fashion, "--limit", 16, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["images"] == 16 and 0 <= d["top1"] <= d["top5"] <= 1 and d["images_per_s"] > 0
    r = invoke("eval", run_lm4, "--data", fashion, "--limit", 16, "--json")
    assert r.exit_code == 0, r.output
    t = json.loads(r.output)
    assert t["backend"].startswith("pytorch") and t["top1"] == d["top1"]


def test_compare_logits_metrics():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    c = compare_logits(ref, ref)
    assert c["top1_agreement"] == 1.0 and c["sqnr_db"] == float("inf") and c["cosine_min"] == pytest.approx(1.0)
    c = compare_logits(ref, ref + 0.1 * np.array([[0, 0, 1.0], [1.0, 0, 0]]))
    assert 20 < c["sqnr_db"] < 40


def _one_line_error(r):
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("wnconvert: error:"), r.output
    return lines[0]


def test_bad_inputs(run_lm4, tmp_path):
    assert "unknown precision" in _one_line_error(invoke("export", run_lm4, "--precision", "int3"))
    assert "calibration" in _one_line_error(invoke("export", run_lm4, "--precision", "int8"))
    assert "--act-bits" in _one_line_error(invoke("export", run_lm4, "--precision", "int4",
                                                  "--act-bits", "5"))
    assert "activation type" in _one_line_error(invoke("export", run_lm4, "--precision", "int4",
                                                       "--act-bits", "8", "--act-type", "int16"))
    bare = tmp_path / "bare"
    r = invoke("finetune", "resnet18", "--weights", "none", "--num-classes", 10, "--epochs", 0,
               "--image-size", 32, "--no-export", "--out", bare)
    assert r.exit_code == 0, r.output
    assert "no model.onnx" in _one_line_error(invoke("export", bare, "--precision", "int4"))
    assert "--weight-bits" in _one_line_error(invoke(
        "finetune", "resnet18", "--weights", "none", "--num-classes", 10, "--epochs", 0,
        "--image-size", 32, "--scheme", "weight-std", "--weight-bits", 4, "--out", tmp_path / "ws"))
    _one_line_error(invoke("eval", tmp_path / "missing.onnx", "--data", "synthetic:10"))


# -- verify on low-precision files ------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory, fashion):
    """A --weight-bits 4 run with a lossless int4 (weights only) and a lossy W8A8 int8 file."""
    run = _finetune(tmp_path_factory.mktemp("vq") / "run", "layer-max", "--weight-bits", 4)
    for args in (("--precision", "int4"),
                 ("--precision", "int8", "--data", fashion, "--calib-samples", 16)):
        r = invoke("export", run, *args)
        assert r.exit_code == 0, r.output
    return run


def _verify_json(*args):
    r = invoke("verify", *args, "--json")
    return r, (json.loads(r.output) if r.exit_code == 0 else None)


def test_verify_checks_every_artifact_under_its_contract(exported, fashion):
    out = verify_run(exported, VerifyRequest(data=fashion, limit=16, thresholds=QuantThresholds(0, 0)))
    d = json.loads(json.dumps(out.result))
    assert out.passed and d["passed"] and set(d["candidates"]) == {"onnx-ort-no-opt", "onnx-ort-opt"}
    q = d["quantized"]
    assert set(q) == {"int4", "int8"}
    # int4 weights-only of a 4-bit run: the trained model's own tolerance, opt off and on
    assert q["int4"]["contract"] == "lossless"
    assert set(q["int4"]["parity"]["candidates"]) == {"onnx-ort-no-opt", "onnx-ort-opt"}
    assert all(c["rel"] <= 1e-4 and c["top1"] == 1.0 for c in q["int4"]["parity"]["candidates"].values())
    # W8A8 quantizes activations: judged against model.onnx on the data's images
    assert q["int8"]["contract"] == "lossy" and q["int8"]["inputs"].startswith("16 images from")
    assert q["int8"]["vs_fp32"]["samples"] == 16 and np.isfinite(q["int8"]["vs_fp32"]["sqnr_db"])
    runs = q["int8"]["by_optimization"]  # the file as written and as deployed
    assert set(runs) == {"off", "on"} and q["int8"]["vs_fp32"]["sqnr_db"] == min(
        r["sqnr_db"] for r in runs.values())
    assert json.loads((exported / "report.json").read_text())["verify"]["quantized"].keys() == q.keys()


def test_verify_lossy_thresholds_fail_with_exit_3(exported, fashion):
    r = invoke("verify", exported, "--precision", "int8", "--data", fashion, "--limit", 16,
               "--min-sqnr", 200)
    assert r.exit_code == 3, r.output
    assert "int8: SQNR" in r.output and "< 200 dB (optimizations off)" in r.output
    assert "< 200 dB (optimizations on)" in r.output


def test_verify_catches_a_wrong_int4_scale(exported, tmp_path):
    """A single wrong scale in an otherwise lossless file breaks the trained model's tolerance."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(exported, run)
    scale_first_dequantized_weight(run / "model.int4.onnx", 1.25)
    # recorded as if export had written it so: the contract check, not the sha256, must catch it
    RunDir(run).record(RunDir(run).manifest(), "model.int4.onnx")
    r = invoke("verify", run, "--precision", "int4")
    assert r.exit_code == 3, r.output
    assert "int4: onnx-ort" in r.output


def test_verify_onnx_option_detects_precision(exported, fashion):
    from wnconvert.convert.quant_check import detect_precision

    assert [detect_precision(exported / n) for n in ("model.onnx", "model.int8.onnx", "model.int4.onnx")] \
        == ["fp32", "int8", "int4"]
    r, d = _verify_json(exported, "--onnx", exported / "model.int8.onnx", "--data", fashion,
                        "--limit", 8, "--min-agreement", 0, "--min-sqnr", 0)
    assert r.exit_code == 0, r.output
    assert list(d["quantized"]) == ["int8"] and "candidates" not in d


def test_verify_bad_inputs(exported, run_lm4):
    assert "--onnx or --precision" in _one_line_error(invoke(
        "verify", exported, "--precision", "int4", "--onnx", exported / "model.int4.onnx"))
    (run_lm4 / "model.fp16.onnx").unlink(missing_ok=True)  # a run never exported to fp16:
    manifest = RunDir(run_lm4).manifest()                    # nor recorded (else verify exits 3)
    manifest.artifacts.pop("model.fp16.onnx", None)
    RunDir(run_lm4).write_manifest(manifest)
    assert "export" in _one_line_error(invoke("verify", run_lm4, "--precision", "fp16"))
    assert "unknown precision" in _one_line_error(invoke("verify", run_lm4, "--precision", "int3"))
    assert "--min-agreement" in _one_line_error(invoke("verify", run_lm4, "--min-agreement", 2))


def _cuda_here():
    import onnxruntime as ort
    import torch

    return torch.cuda.is_available(), "CUDAExecutionProvider" in ort.get_available_providers()


def test_cuda_provider_without_cuda_is_a_clear_error(run_lm4, fashion):
    torch_cuda, ort_cuda = _cuda_here()
    if not torch_cuda:
        msg = _one_line_error(invoke("eval", run_lm4, "--data", fashion, "--provider", "cuda"))
        assert "no CUDA device" in msg
    if not ort_cuda:
        msg = _one_line_error(invoke("eval", run_lm4 / "model.onnx", "--data", fashion, "--provider", "cuda"))
        assert "CUDAExecutionProvider" in msg
    if torch_cuda and ort_cuda:
        pytest.skip("CUDA is available here: see test_eval_on_cuda_agrees_with_cpu")


@pytest.mark.skipif(not any(_cuda_here()), reason="needs CUDA in PyTorch or onnxruntime")
def test_eval_on_cuda_agrees_with_cpu(run_lm4, fashion):
    torch_cuda, ort_cuda = _cuda_here()
    for artifact, usable in ((run_lm4, torch_cuda), (run_lm4 / "model.onnx", ort_cuda)):
        if not usable:
            continue
        r = invoke("eval", artifact, "--data", fashion, "--limit", 32, "--json")
        g = invoke("eval", artifact, "--data", fashion, "--limit", 32, "--provider", "cuda", "--json")
        assert r.exit_code == 0 and g.exit_code == 0, (r.output, g.output)
        cpu, gpu = json.loads(r.output), json.loads(g.output)
        assert "cuda" in gpu["backend"].lower()
        assert abs(cpu["top1"] - gpu["top1"]) <= 1 / 32  # TF32 may flip a near tie


# -- golden vectors of a run's integer file ----------------------------------------------------------

def _with_float_mul(model):
    """A copy of ``model`` whose last layer's result is multiplied by 2 in float before its
    QuantizeLinear (an op the integer reference has no form for)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = list(out.graph.node)
    at = max(i for i, n in enumerate(nodes) if n.op_type == "QuantizeLinear")
    out.graph.initializer.append(onnx.numpy_helper.from_array(np.float32(2.0), "two"))
    nodes.insert(at, onnx.helper.make_node("Mul", [nodes[at].input[0], "two"], ["doubled"], name="float_mul"))
    nodes[at + 1].input[0] = "doubled"
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def test_golden_command(exported, fashion, tmp_path):
    """``wnconvert golden``: a power-of-two QDQ file (``--onnx``) on a run's images is integer-only
    and equals onnxruntime tensor for tensor; a file with an op the reference has no integer form
    for is refused by name."""
    from qdq_graphs import ort_run, tiny_cnn

    from wnconvert.convert.golden import read_golden
    from wnconvert.models.data.data import eval_arrays
    from wnconvert.models.run.rundir import RunDir

    assert "--count" in _one_line_error(invoke("golden", exported, "--data", fashion, "--count", 0,
                                               "--out", tmp_path / "g0"))
    assert "without --data" in _one_line_error(invoke("golden", exported, "--out", tmp_path / "g0"))
    # this layer-max run's int8 file: its classifier (output scale and bias folded) is one Gemm
    r = invoke("golden", exported, "--data", fashion, "--count", 2, "--out", tmp_path / "g1", "--json")
    assert r.exit_code == 0, r.output
    model = tiny_cnn(seed=1).model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    for d, size in ((2, 32), (3, 32)):
        model.graph.input[0].type.tensor_type.shape.dim[d].dim_value = size
    onnx.save(_with_float_mul(model), tmp_path / "mul.onnx")
    assert "unsupported op in the integer graph: Mul" in _one_line_error(
        invoke("golden", exported, "--onnx", tmp_path / "mul.onnx", "--data", fashion, "--out", tmp_path / "g0"))
    onnx.save(model, tmp_path / "po2.onnx")
    r = invoke("golden", exported, "--onnx", tmp_path / "po2.onnx", "--data", fashion, "--count", 3,
               "--out", tmp_path / "g", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["images"] == 3 and summary["integer_only"] and not summary["over_2_24"]
    golden = read_golden(tmp_path / "g")
    assert len(golden["index"]["layers"]) == summary["tensors"] == len(golden["arrays"])
    x, _ = eval_arrays(fashion, RunDir(exported).manifest().preprocess, limit=3)
    for level in ("off", "on"):
        got = ort_run(model, x, level)
        for layer in golden["index"]["layers"]:
            name = layer["tensor"]
            if name in got:
                assert np.array_equal(got[name].astype(np.int64), golden["arrays"][name].astype(np.int64)), name
