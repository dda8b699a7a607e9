"""onnxruntime images/s of an activation-QAT W8A8 QDQ export vs the fp32 file of the same network.

    .venv/bin/python benchmarks/actquant_speed.py [--model resnet18] [--batch 64] [--size 32]

The network is randomly initialised (weights none), calibrated on random batches and exported; the
speed of a file does not depend on its values. Best of ``--repeats`` timed runs, one thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from wnconvert.convert.actquant import ActQuantConfig, calibrate, export_qdq, freeze_bn, prepare_qat
from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.export import export_onnx
from wnconvert.convert.fold import FoldConfig, fold_model
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.models.zoo.zoo import build_model


def images_per_second(path: Path, x: np.ndarray, repeats: int, threads: int) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"input": x})
    best = min(_timed(sess, x) for _ in range(repeats))
    return len(x) / best


def _timed(sess, x) -> float:
    t = time.perf_counter()
    sess.run(None, {"input": x})
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(a.model, "none", 10).model.eval()
    apply_scheme(model, SchemeConfig("channel-max", weight_bits=8))
    x = torch.randn(a.batch, 3, a.size, a.size)
    q = prepare_qat(model, ActQuantConfig(8))
    calibrate(q, [x[:16]])
    freeze_bn(q)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(fold_model(model, x[:1], FoldConfig(bn="fold")).model, x[:1], Path(tmp) / "model.onnx")
        w8a8 = Path(tmp) / "model_w8a8.onnx"
        export_qdq(q, w8a8, example_shape=(1, 3, a.size, a.size))
        xs = x.numpy()
        f = images_per_second(fp32, xs, a.repeats, a.threads)
        i = images_per_second(w8a8, xs, a.repeats, a.threads)
    print(f"{a.model} batch {a.batch} {a.size}px, {a.threads} thread(s): fp32 {f:.0f} img/s, "
          f"W8A8 QDQ {i:.0f} img/s, ratio {i / f:.2f}")


if __name__ == "__main__":
    main()
