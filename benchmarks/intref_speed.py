"""Milliseconds per image of the integer reference (convert/intref), its plain int64 products
against its exact BLAS products (float32/float64 where each layer's partial-sum bound proves them
exact), next to onnxruntime's fp32 file of the same network; both paths in one process, and the
two runs compared tensor by tensor (they must agree bit for bit).

    .venv/bin/python benchmarks/intref_speed.py [--model resnet18 --size 32 --images 8]
    .venv/bin/python benchmarks/intref_speed.py --model resnet50 --size 224 --images 2

The network is randomly initialised, its weights channel-max reparametrized at ``--weight-bits``,
``--act-bits`` activation quantization with power-of-two scales (``--scale-format po2``, the files
golden and bit-exact verify read), calibrated on random batches and exported with export_qdq; the
speed of the reference does not depend on what the network learned. Timings: best of
``--repeats`` runs over the same batch of ``--images`` images; onnxruntime with all graph
optimizations and as many intra-op threads as numpy's BLAS uses by default (``--threads``, 0: the
runtime's default).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from wnconvert.convert.actquant import ActQuantConfig, calibrate, export_qdq, freeze_bn, prepare_qat
from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.export import export_onnx
from wnconvert.convert.fold import FoldConfig, fold_model
from wnconvert.convert.intref import compare_runs, kernels, read_graph, run_integer
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.models.zoo.zoo import build_model


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--weight-bits", type=int, default=8)
    ap.add_argument("--act-bits", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slow-repeats", type=int, default=1, help="repeats of the int64 path")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(a.model, "none", 10).model.eval()
    apply_scheme(model, SchemeConfig("channel-max", weight_bits=a.weight_bits))
    x = torch.randn(a.images, 3, a.size, a.size)
    q = prepare_qat(model, ActQuantConfig(a.act_bits, scale_format="po2"))
    calibrate(q, [torch.randn(4, 3, a.size, a.size) for _ in range(2)])
    freeze_bn(q)
    xs = x.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(fold_model(model, x[:1], FoldConfig(bn="fold")).model, x[:1], Path(tmp) / "model.onnx")
        qdq = Path(tmp) / "model_qdq.onnx"
        export_qdq(q, qdq, example_shape=(1, 3, a.size, a.size), container="int8")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = a.threads
        sess = ort.InferenceSession(str(fp32), opts, providers=["CPUExecutionProvider"])
        sess.run(None, {"input": xs})
        t_ort = best(lambda: sess.run(None, {"input": xs}), a.repeats)
        runs = {}

        def timed(mode: str) -> float:
            def go():
                with kernels.products(mode):
                    runs[mode] = run_integer(qdq, xs)
            return go

        t_fast = best(timed("auto"), a.repeats)
        t_slow = best(timed("int64"), a.slow_repeats)
        graph = read_graph(qdq)   # bit-exact verify: the file read once, then batch after batch
        with kernels.products("auto"):
            run_integer(graph, xs[:1])
            t_batch = best(lambda: runs.__setitem__("graph", run_integer(graph, xs)), a.repeats)
    mismatch = compare_runs(runs["int64"], runs["auto"]) or compare_runs(runs["int64"], runs["graph"])
    per = 1000 / a.images
    print(f"{a.model} {a.size}px W{a.weight_bits}A{a.act_bits} po2, {a.images} images, "
          f"{torch.get_num_threads()} torch / ort threads {a.threads or 'default'}: "
          f"onnxruntime fp32 {t_ort * per:.2f} ms/image; integer reference on the file (one call, as golden): "
          f"int64 {t_slow * per:.1f} ms/image, exact BLAS {t_fast * per:.2f} ms/image, speed-up "
          f"{t_slow / t_fast:.1f}x, "
          f"{t_fast / t_ort:.1f}x onnxruntime fp32; on a graph read once (as bit-exact verify): "
          f"{t_batch * per:.2f} ms/image, speed-up {t_slow / t_batch:.1f}x, {t_batch / t_ort:.1f}x onnxruntime fp32; "
          f"{len(runs['auto'].tensors)} tensors, "
          f"{'bit for bit the same' if mismatch is None else f'DIFFER: {mismatch}'}")
    if mismatch is not None:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
