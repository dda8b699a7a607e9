"""Images/s of W4A4 and W4A8 QDQ files (int8 container, the ort-cpu/openvino default) against the
fp32 file of the same network, in onnxruntime and OpenVINO, and against the same file written the
old way (the 4-bit range as a float Clip before each QuantizeLinear); ratios in one run.

    .venv/bin/python benchmarks/lowbit_kernels.py [--model resnet18] [--size 32] [--batch 64]

The export writes the grid's range in the quantized domain (Q -> integer Clip -> DQ), so the
convolutions and adds fuse into integer kernels; the old form is rebuilt from the new file (each
integer Clip moved before its QuantizeLinear as a float Clip to ``[qmin·s, qmax·s]``) and must give
the same logits bit for bit (onnxruntime, optimizations off). The network is randomly initialised
and calibrated on random batches: speed does not depend on what it learned. Each round times every
file in turn (onnxruntime: all graph optimizations, ``--threads`` intra-op threads; OpenVINO: CPU
plugin, f32 inference precision, the same threads); best of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from wnconvert.convert.actquant import ActQuantConfig, calibrate, export_qdq, freeze_bn, prepare_qat
from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.export import export_onnx
from wnconvert.convert.fold import FoldConfig, fold_model
from wnconvert.convert.openvino_rt import ov_runner
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.models.zoo.zoo import build_model


def float_clip_form(path: Path, out: Path) -> int:
    """The file with each ``Q -> integer Clip`` rewritten as ``float Clip -> Q`` (the export before)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {n.output[0]: n for n in model.graph.node}
    nodes, moved = [], 0
    for n in model.graph.node:
        q = producer.get(n.input[0]) if n.op_type == "Clip" else None
        if q is None or q.op_type != "QuantizeLinear":
            nodes.append(n)
            continue
        s = float(numpy_helper.to_array(inits[q.input[1]]))
        zp = int(numpy_helper.to_array(inits[q.input[2]]))
        lo, hi = (int(numpy_helper.to_array(inits[n.input[i]])) - zp for i in (1, 2))
        for name, v in ((f"{n.name}_flo", lo * s), (f"{n.name}_fhi", hi * s)):
            model.graph.initializer.append(numpy_helper.from_array(np.float32(v), name))
        clip = helper.make_node("Clip", [q.input[0], f"{n.name}_flo", f"{n.name}_fhi"], [f"{n.name}_float"],
                                name=f"{n.name}_float")
        nodes.remove(q)
        nodes += [clip, helper.make_node("QuantizeLinear", [clip.output[0], *q.input[1:]], [n.output[0]], name=q.name)]
        moved += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return moved


def ort_session(path: Path, threads: int, optimized: bool = True, save: Path | None = None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if save is not None:
        opts.optimized_model_filepath = str(save)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def fused_ops(path: Path, threads: int, tmp: Path) -> dict:
    ort_session(path, threads, save=tmp / "opt.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp / "opt.onnx")).graph.node)
    return {k: ops[k] for k in ("QLinearConv", "QLinearAdd", "Conv", "FusedConv", "Add") if ops[k]}


def timed(run, x: np.ndarray) -> float:
    t = time.perf_counter()
    run(x)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    x = torch.randn(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    xs = x.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {}
        for wb, ab in ((4, 4), (4, 8)):
            torch.manual_seed(0)
            model = build_model(a.model, "none", 10).model.eval()
            apply_scheme(model, SchemeConfig("channel-max", weight_bits=wb))
            if "fp32" not in files:
                folded = fold_model(model, x[:1], FoldConfig(bn="fold")).model
                files["fp32"] = export_onnx(folded, x[:1], tmp / "fp32.onnx")
            q = prepare_qat(model, ActQuantConfig(ab))
            calibrate(q, [x[:16]])
            freeze_bn(q)
            name = f"W{wb}A{ab}"
            files[name] = tmp / f"{name}.onnx"
            export_qdq(q, files[name], example_shape=(1, 3, a.size, a.size), container="int8")
            if ab == 4:
                files[f"{name} float Clip"] = tmp / f"{name}_float_clip.onnx"
                moved = float_clip_form(files[name], files[f"{name} float Clip"])
                off = [ort_session(files[k], a.threads, optimized=False).run(None, {"input": xs})[0]
                       for k in (name, f"{name} float Clip")]
                print(f"{name}: {moved} integer Clips; logits of the float-Clip form (optimizations off): "
                      f"{'bit for bit the same' if np.array_equal(off[0], off[1]) else 'DIFFERENT'}")
        for k, p in files.items():
            print(f"{k}: onnxruntime optimized graph {fused_ops(p, a.threads, tmp)}")
        runners = {}
        for k, p in files.items():
            sess = ort_session(p, a.threads)
            runners[("onnxruntime", k)] = lambda v, s=sess: s.run(None, {"input": v})
            runners[("openvino", k)] = ov_runner(p, num_threads=a.threads)
        for run in runners.values():
            run(xs)
        best = {key: min(timed(run, xs) for _ in range(1)) for key, run in runners.items()}
        for _ in range(a.rounds - 1):
            for key, run in runners.items():
                best[key] = min(best[key], timed(run, xs))
    print(f"{a.model} {a.size}px batch {a.batch}, {a.threads} thread(s), best of {a.rounds} rounds:")
    for rt in ("onnxruntime", "openvino"):
        base = a.batch / best[(rt, "fp32")]
        row = ", ".join(f"{k} {a.batch / best[(rt, k)]:.0f} img/s ({best[(rt, 'fp32')] / best[(rt, k)]:.2f}x)"
                        for k in files)
        print(f"  {rt}: {row}  [fp32 {base:.0f} img/s = 1.00x]")


if __name__ == "__main__":
    main()
