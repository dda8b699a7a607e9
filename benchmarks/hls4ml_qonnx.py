"""hls4ml on wnconvert's QONNX files: convert with hls4ml's ONNX frontend, compile its bit-accurate
C++ emulation with the machine's g++, and compare its outputs with the integer reference.

    python benchmarks/hls4ml_qonnx.py --tiny [--count 64]          # a tiny CNN, W4A4 po2, Fashion-MNIST
    python benchmarks/hls4ml_qonnx.py RUN [--count 64]             # RUN/model.qonnx.onnx of a run

Needs the ``fpga`` extra (``pip install hls4ml[onnx]``; qonnx comes with the ``test`` extra) and g++.

What is done to the file before hls4ml sees it, all of it printed:

* qonnx's cleaning as hls4ml's documentation prescribes (``cleanup_model``,
  ``ConvertToChannelsLastAndClean``, ``GemmToMatMul``, ``cleanup_model``);
* a weight whose per-output-channel scales differ (a po2 classifier, most convs of a trained
  network) is re-expressed per tensor: scale ``min s_c`` and bit width ``B + log2(max s_c / min s_c)``,
  the same values. hls4ml 1.3 moves only a scalar scale below a MatMul, and below a Conv only a
  scalar one when the Conv has a bias (every BatchNorm-folded conv has one); otherwise its
  ``ScaleDownMatMul``/``ScaleDownConv`` give up ("Failed to propagate quantization scales") and the
  conversion stops on an orphaned constant (``IndexError``). The wider per-tensor grids are what
  hls4ml then builds: their bit widths are printed.

What hls4ml 1.3 gets wrong (found with per-layer traces of the tiny CNN): qonnx's channels-last
conversion leaves a Transpose back to NCHW in front of ``GlobalAveragePool`` (it moves Transposes
through Conv, MaxPool, BatchNorm and elementwise ops, not through global pooling), and hls4ml's
``GlobalPooling2D`` parser declares its input channels-last, so it averages the wrong elements: every
layer up to that point equals qonnx's executor, the average does not. With a 1x1 map before the
pooling (ResNet-18 at 32 px; ``--tiny --squeeze``) both layouts hold the same data.

Compared: hls4ml's ``predict`` (the compiled C++ emulation, ap_fixed arithmetic) against the integer
reference of the run's QDQ file (``wnconvert.convert.intref``), on the logits (the last point's
integers times its scale): elements equal, top-1 agreement. Printed as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

os.environ.setdefault("WNCONVERT_OFFLINE", "1")


class TinyNet(nn.Module):
    """conv/BN/ReLU, max pooling, conv/BN + residual add, ReLU, global average pooling, linear."""

    def __init__(self, width: int = 8, squeeze: int = 0):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        # squeeze > 0: max pooling down to 1x1 before the global average (as ResNet-18 at 32 px has)
        self.squeeze = nn.MaxPool2d(squeeze) if squeeze else nn.Identity()
        self.gap, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(width, 10)

    def forward(self, x):
        y = self.pool(torch.relu(self.bn1(self.conv1(x))))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(torch.flatten(self.gap(self.squeeze(y)), 1))


def tiny_files(work: Path, count: int, size: int, wbits: int, abits: int, squeeze: bool = False):
    """The tiny CNN (random init, BatchNorm statistics from the images), calibrated on 256 Fashion-MNIST
    training images, exported as QDQ and QONNX; returns (qonnx, qdq, test images)."""
    from wnconvert.convert.actquant import (
        ActQuantConfig,
        calibrate,
        export_qdq,
        prepare_qat,
    )
    from wnconvert.convert.actquant.export_qonnx import export_qonnx
    from wnconvert.convert.apply import apply_scheme
    from wnconvert.convert.schemes import SchemeConfig
    from wnconvert.models.data.data import eval_arrays
    from wnconvert.models.data.preprocess import Preprocess

    pre = Preprocess(size, size, (0.286, 0.286, 0.286), (0.353, 0.353, 0.353), grayscale_to_rgb=True)
    calib, _ = eval_arrays("fashion-mnist", pre, limit=256, split="train")
    x, _ = eval_arrays("fashion-mnist", pre, limit=count, split="val")
    torch.manual_seed(0)
    m = TinyNet(squeeze=size // 2 if squeeze else 0)
    m.train()
    with torch.no_grad():  # BatchNorm statistics of the data, so that activations have sane ranges
        for _ in range(4):
            m(torch.from_numpy(calib))
    m.eval()
    apply_scheme(m, SchemeConfig("channel-max", weight_bits=wbits))
    q = prepare_qat(m, ActQuantConfig(abits, scale_format="po2"))
    calibrate(q, [torch.from_numpy(calib[i:i + 64]) for i in range(0, 256, 64)])
    q.eval()
    export_qdq(q, work / "model.qdq.onnx", example_shape=(1, 3, size, size))
    export_qonnx(q, work / "model.qonnx.onnx", example_shape=(1, 3, size, size))
    return work / "model.qonnx.onnx", work / "model.qdq.onnx", x


def run_files(run: Path, work: Path, count: int, data: str | None):
    """RUN/model.qonnx.onnx, the run's QDQ file (or one written from its trained network) and
    ``count`` validation images of its data."""
    from wnconvert.convert.actquant import export_qdq
    from wnconvert.models.data.data import eval_arrays
    from wnconvert.models.run.qonnx_run import QONNX_FILE, own_qdq_file
    from wnconvert.models.run.rundir import RunDir

    rd = RunDir(run)
    manifest = rd.manifest()
    qonnx_path = rd.path / QONNX_FILE
    if not qonnx_path.is_file():
        sys.exit(f"{qonnx_path} missing: run `wnconvert export {run} --target qonnx` first")
    qdq = own_qdq_file(rd, manifest)
    if qdq is None:
        _, qat = rd.load_qat()
        qdq = work / "model.qdq.onnx"
        export_qdq(qat, qdq, example_shape=(1, *manifest.input_shape))
    x, _ = eval_arrays(data or manifest.data, manifest.preprocess, limit=count, split="val")
    return qonnx_path, qdq, x


def per_tensor_weights(model: onnx.ModelProto) -> list[str]:
    """Rewrite each weight Quant (MatMul, or Conv with a bias) with unequal power-of-two scales as a
    per-tensor one holding the same values (see the module docstring); returns what was changed."""
    inits = {t.name: t for t in model.graph.initializer}
    users = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Conv") and len(n.input) > 1}
    notes = []
    for n in model.graph.node:
        if n.op_type != "Quant" or n.input[0] not in inits or n.output[0] not in users:
            continue
        s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        if np.all(s == s.reshape(-1)[0]):
            continue
        spread = np.log2(s.max() / s.min())
        if spread != round(spread):
            raise SystemExit(f"{n.name}: per-channel scales that are not powers of two; hls4ml needs a scalar here")
        bits = float(numpy_helper.to_array(inits[n.input[3]]))
        new_bits = bits + round(spread)
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(np.float32(s.min()), n.input[1]))
        inits[n.input[2]].CopyFrom(numpy_helper.from_array(np.float32(0), n.input[2]))
        inits[n.input[3]].CopyFrom(numpy_helper.from_array(np.float32(new_bits), n.input[3]))
        notes.append(f"{n.name}: per-channel scales -> per-tensor {s.min():g}, bit width {bits:g} -> {new_bits:g}")
    return notes


def _non_negative(graph, name: str, inits: dict) -> str | None:
    """Why tensor ``name`` holds no negative value, or None when the graph does not show it: it is a
    ``Relu`` output, or the output of an unsigned ``Quant`` (signed=0) with zero point 0 and a positive
    scale, whose values ``(q - 0)·s`` have q in [0, 2^B - 1]."""
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is None:
        return None
    if producer.op_type == "Relu":
        return f"{producer.name or name}: Relu output"
    if producer.op_type == "Quant":
        signed = next((a.i for a in producer.attribute if a.name == "signed"), 1)
        if signed != 0 or any(i not in inits for i in producer.input[1:3]):
            return None
        scale = numpy_helper.to_array(inits[producer.input[1]])
        zero = numpy_helper.to_array(inits[producer.input[2]])
        if np.all(scale > 0) and np.all(zero == 0):
            return f"{producer.name}: unsigned Quant, zero point 0"
    return None


def pad_pools(model: onnx.ModelProto) -> list[str]:
    """Rewrite each channels-last ``MaxPool`` with padding whose input is provably non-negative into
    ``Pad`` (constant 0) + ``MaxPool`` without padding; returns what was changed.

    hls4ml 1.3 gets padded max pooling wrong or refuses it: its streaming pooling
    (``nnet::pooling2d_buffer_cl``, io_stream) asserts that a pooling has no padding, and its parallel one
    (``nnet::pooling2d_cl``, io_parallel) fills the padded cells with ``pad_val``, the type's top bit set,
    which is the most negative value of a signed type but a large positive one (2^(I-1)) of an unsigned
    ``ap_ufixed<W,I>``: after a ReLU the border outputs come out wrong. Its ``ZeroPadding2D`` takes
    both io types. ONNX pads a max pooling with -inf, so a zero pad is the same
    function only when no input value is negative: then every window (which holds at least one real
    element, each >= 0) has a maximum >= 0, and an added 0 cannot exceed it. The proof is read off the
    graph (``_non_negative``): a pooling whose input is not shown non-negative is left as it is."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    notes, nodes = [], []
    for n in graph.node:
        n = onnx.NodeProto.FromString(n.SerializeToString())
        nodes.append(n)
        if n.op_type != "MaxPool" or n.domain != "qonnx.custom_op.channels_last":
            continue
        attrs = {a.name: a for a in n.attribute}
        pads = list(attrs["pads"].ints) if "pads" in attrs else []
        if not any(pads):
            continue
        why = _non_negative(graph, n.input[0], inits)
        if why is None:
            notes.append(f"{n.name}: padded max pooling left as it is (input not shown non-negative)")
            continue
        if len(pads) != 4 or n.input[0] not in shapes:
            raise SystemExit(f"{n.name}: a 2-D max pooling with a known input shape expected")
        top, left, bottom, right = pads
        b, h, w, c = shapes[n.input[0]]  # channels-last: N, H, W, C
        padded = f"{n.input[0]}_zero_padded"
        graph.initializer.extend([
            numpy_helper.from_array(np.array([0, top, left, 0, 0, bottom, right, 0], np.int64), f"{padded}_pads"),
            numpy_helper.from_array(np.array(0, np.float32), f"{padded}_value")])
        pad = onnx.helper.make_node("Pad", [n.input[0], f"{padded}_pads", f"{padded}_value"], [padded],
                                    name=f"Pad_{n.name}", mode="constant")
        graph.value_info.append(onnx.helper.make_tensor_value_info(
            padded, onnx.TensorProto.FLOAT, [b, h + top + bottom, w + left + right, c]))
        n.input[0] = padded
        attrs["pads"].ints[:] = [0, 0, 0, 0]
        nodes.insert(len(nodes) - 1, pad)
        notes.append(f"{n.name}: pads {pads} -> Pad(constant 0) + MaxPool without padding ({why})")
    del graph.node[:]
    graph.node.extend(nodes)
    return notes


def same_function(before: onnx.ModelProto, after: onnx.ModelProto, x: np.ndarray) -> dict:
    """Run both cleaned graphs in qonnx's executor on the images ``x``; the outputs must be equal."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    outs = []
    for model in (before, after):
        mw = ModelWrapper(model)
        iname, oname = mw.graph.input[0].name, mw.graph.output[0].name
        outs.append(np.stack([execute_onnx(mw, {iname: x[i:i + 1]})[oname] for i in range(len(x))]))
    return {"images": len(x), "elements": int(outs[0].size), "equal": bool(np.array_equal(*outs))}


def trace_layers(hls_model, mw, feed: np.ndarray, x: np.ndarray) -> dict:
    """Every traced hls4ml layer's output against the same tensor in qonnx's executor (on the graph
    hls4ml was given, channels-last like hls4ml's), image by image: elements equal per layer, in
    hls4ml's layer order, and the first layer that differs. hls4ml folds a bias ``Add`` and a
    ``Quant`` into the layer before them (a Dense's bias, its output type the quantized one), so a
    layer is compared with its own tensor and with those after it that hls4ml has no layer for
    (through single ``Add``/``Quant`` consumers), and the best of them is kept ("against")."""
    from qonnx.core.onnx_exec import execute_onnx

    outputs = {layer.name: layer.outputs[0] for layer in hls_model.get_layers()}
    consumers: dict[str, list] = {}
    for n in mw.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    made = set(outputs.values())

    def folded(tensor: str) -> list[str]:  # the tensor and those hls4ml may have folded into its layer
        chain = [tensor]
        while len(chain) < 4:
            c = consumers.get(chain[-1], [])
            if len(c) != 1 or c[0].op_type not in ("Add", "Quant") or c[0].output[0] in made:
                break
            chain.append(c[0].output[0])
        return chain

    rows: dict[str, list] = {}
    compile_again, hls_model.compile = hls_model.compile, lambda: None  # built with tracing already
    try:
        _, traces = hls_model.trace(np.ascontiguousarray(feed))
    finally:
        hls_model.compile = compile_again
    for i in range(len(x)):
        ctx = execute_onnx(mw, {mw.graph.input[0].name: x[i:i + 1]}, return_full_exec_context=True)
        for name, layer_trace in traces.items():
            b = np.asarray(layer_trace[i], np.float64).ravel()
            best = None
            for t in folded(outputs.get(name)) if outputs.get(name) else []:
                want = ctx.get(t)
                if want is not None and np.size(want) == b.size:
                    equal = int(np.count_nonzero(np.asarray(want, np.float64).ravel() == b))
                    best = max(best or (equal, t), (equal, t), key=lambda e: e[0])
            if best is None:
                continue  # a layer hls4ml made itself (no tensor of the same name and size in the graph)
            row = rows.setdefault(name, [best[1], 0, 0])
            row[1] += b.size
            row[2] += best[0]
    layers = [{"layer": k, "tensor": outputs[k], "against": v[0], "elements": v[1], "equal": v[2]}
              for k, v in rows.items()]
    first = next((r["layer"] for r in layers if r["equal"] != r["elements"]), None)
    return {"images": len(x), "layers": layers, "first_differing_layer": first}


def reference_logits(qdq: Path, x: np.ndarray) -> tuple[np.ndarray, float]:
    """The integer reference's logits (the last point's integers times its scale, float32) and that scale."""
    from wnconvert.convert.intref import run_integer

    run = run_integer(onnx.load(str(qdq)), x)
    last = list(run.tensors.values())[-1]
    scale = float(last.scale)
    return (last.values.astype(np.int64) - last.zero_point).astype(np.float32) * np.float32(scale), scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", type=Path, help="a run directory with model.qonnx.onnx")
    ap.add_argument("--tiny", action="store_true", help="the tiny custom CNN instead of a run")
    ap.add_argument("--size", type=int, default=32, help="--tiny: image size")
    ap.add_argument("--squeeze", action="store_true", help="--tiny: max-pool to 1x1 before the global average pooling")
    ap.add_argument("--bits", type=int, nargs=2, default=(4, 4), metavar=("W", "A"), help="--tiny: weight and "
                                                                                          "activation bits")
    ap.add_argument("--count", type=int, default=64, help="test images compared")
    ap.add_argument("--data", default=None, help="images of a run (default: its data)")
    ap.add_argument("--precision", default="fixed<48,24>", help="hls4ml's default precision (accumulators, biases)")
    ap.add_argument("--io-type", default="io_parallel", choices=("io_parallel", "io_stream"))
    ap.add_argument("--strategy", default="Latency", choices=("Latency", "Resource"))
    ap.add_argument("--reuse-factor", type=int, default=1)
    ap.add_argument("--keep-pool-padding", action="store_true",
                    help="leave padded max poolings as they are (hls4ml's io_stream emulation aborts, its "
                         "io_parallel one pads an unsigned max pooling with a large positive value)")
    ap.add_argument("--check-rewrite", type=int, default=2, metavar="N",
                    help="images on which qonnx's executor must give the same outputs before and after the "
                         "pooling rewrite (0: no check)")
    ap.add_argument("--trace", type=int, default=0, metavar="N",
                    help="trace every hls4ml layer on N images and compare it with qonnx's executor on the graph "
                         "hls4ml was given (the first layer that differs is printed)")
    ap.add_argument("--no-compile", action="store_true", help="stop after hls4ml's conversion (no g++)")
    ap.add_argument("--out", type=Path, default=None, help="hls4ml project folder (default: a temporary one)")
    args = ap.parse_args()
    if args.tiny == (args.run is not None):
        ap.error("give a RUN directory or --tiny")
    if shutil.which("g++") is None:
        sys.exit("g++ not found: hls4ml's C++ emulation needs it")
    import hls4ml
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    work = Path(tempfile.mkdtemp(prefix="hls4ml-qonnx-"))
    out = args.out or work / "hls"
    result = {"network": "tiny CNN" if args.tiny else str(args.run), "hls4ml": hls4ml.__version__,
              "io_type": args.io_type, "strategy": args.strategy, "default_precision": args.precision}
    if args.tiny:
        qonnx_path, qdq, x = tiny_files(work, args.count, args.size, *args.bits, squeeze=args.squeeze)
        result |= {"bits": f"W{args.bits[0]}A{args.bits[1]} po2", "size": args.size, "squeeze": args.squeeze}
    else:
        qonnx_path, qdq, x = run_files(args.run, work, args.count, args.data)
    model = onnx.load(str(qonnx_path))
    result["rewrites"] = per_tensor_weights(model)
    for note in result["rewrites"]:
        print("rewrite:", note, file=sys.stderr)
    t0 = time.perf_counter()
    mw = cleanup_model(ModelWrapper(model))
    mw = mw.transform(ConvertToChannelsLastAndClean())
    mw = mw.transform(GemmToMatMul())
    mw = cleanup_model(mw)
    if not args.keep_pool_padding:
        before = onnx.ModelProto.FromString(mw.model.SerializeToString())
        result["pool_rewrites"] = pad_pools(mw.model)
        for note in result["pool_rewrites"]:
            print("rewrite:", note, file=sys.stderr)
        if result["pool_rewrites"] and args.check_rewrite:
            result["pool_rewrite_check"] = same_function(before, mw.model, x[:args.check_rewrite])
            if not result["pool_rewrite_check"]["equal"]:
                print(json.dumps(result))
                sys.exit("the pooling rewrite changed qonnx's outputs")
    config = hls4ml.utils.config.config_from_onnx_model(mw, granularity="name", backend="Vivado",
                                                         default_precision=args.precision,
                                                         default_reuse_factor=args.reuse_factor)
    config["Model"]["Strategy"] = args.strategy
    if args.trace:
        for layer in config["LayerName"].values():
            layer["Trace"] = True
    try:
        hls_model = hls4ml.converters.convert_from_onnx_model(mw, output_dir=str(out), backend="Vivado",
                                                              io_type=args.io_type, hls_config=config)
    except Exception as e:  # report hls4ml's refusal and stop
        result |= {"converted": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
        print(json.dumps(result))
        return
    result["convert_s"] = round(time.perf_counter() - t0, 1)
    result["converted"] = True
    result["layers"] = len(list(hls_model.get_layers()))
    if args.no_compile:
        print(json.dumps(result))
        return
    t1 = time.perf_counter()
    hls_model.config.trace_output = bool(args.trace)  # one build serves predict and trace
    hls_model.compile()
    result["compile_s"] = round(time.perf_counter() - t1, 1)
    # the cleaned graph keeps the NCHW input (a Transpose inside); feed whichever layout hls4ml's input has
    shape = list(hls_model.get_input_variables()[0].shape)
    feed = x if shape == list(x.shape[1:]) else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    result["input_layout"] = "NCHW" if feed is x else "NHWC"
    t2 = time.perf_counter()
    y = np.asarray(hls_model.predict(np.ascontiguousarray(feed)), np.float32)
    result["predict_ms_per_image"] = round(1000 * (time.perf_counter() - t2) / len(x), 2)
    ref, step = reference_logits(qdq, x)
    y = y.reshape(ref.shape)
    result |= {"converted": True, "images": len(x), "elements": int(ref.size),
               "equal_elements": int(np.count_nonzero(y == ref)),
               "top1_agreement": float(np.mean(y.argmax(1) == ref.argmax(1))),
               "max_abs_diff_steps": float(np.max(np.abs(y - ref)) / step),
               "project": str(out)}
    if args.trace:
        try:
            result["trace"] = trace_layers(hls_model, mw, feed[:args.trace], x[:args.trace])
        except Exception as e:  # the comparison above stands; say why the trace did not
            result["trace"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
