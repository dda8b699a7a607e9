"""``verify`` of the .tflite of a ``--scale-format po2 --rounding tflite`` run: the trained eval-mode
model and TensorFlow Lite Micro hold the same integers at every quantization point (contract
``tflite-bit-exact``), on top of the ``tflite-one-step`` checks every .tflite gets.

The trained model requantizes with TFLite's arithmetic (convert/actquant/tflite_points.py), runs
free from the float images, and each point ``P``'s integers are compared with the TFLite tensor that
stands for the file's ``P_q`` (the writer's ``held`` map; zero points removed, NHWC back to NCHW).
"""

from __future__ import annotations

import numpy as np
import torch

from wnconvert.convert.actquant import quantizers
from wnconvert.convert.actquant.prepare import act_points

CONTRACT = "tflite-bit-exact"


@torch.no_grad()
def point_integers(qat, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every point's integers in the eval-mode model, read from its output."""
    seen: dict[str, list] = {}
    hooks = [q.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, []).append(
        torch.round(out.float() / mod.scale()).to(torch.int64).numpy())) for name, q in quantizers(qat).items()]
    was = qat.training
    qat.eval()
    try:
        for i in range(0, len(x), 16):
            qat(torch.from_numpy(np.ascontiguousarray(x[i:i + 16], np.float32)))
    finally:
        qat.train(was)
        for h in hooks:
            h.remove()
    return {k: np.concatenate(v) for k, v in seen.items()}


def trained_equals_micro(qat, x: np.ndarray, micro: dict[int, np.ndarray], writer, model_run, to_onnx) -> dict:
    """The contract's result: per point, elements where the trained model and TFLite Micro differ."""
    ours = point_integers(qat, x)
    tensors, missing, failures = [], [], []
    for p in act_points(qat):
        name = f"{p.name}_q"
        held, ref = writer.held.get(name), model_run.tensors.get(name)
        if held is None or ref is None or held.index not in micro:
            missing.append(p.name)
            continue
        got = to_onnx(micro[held.index], held) - int(np.asarray(ref.zero_point).reshape(-1)[0])
        mine = ours[p.name].reshape(got.shape)
        n = int(np.count_nonzero(got != mine))
        tensors.append({"point": p.name, "tensor": name, "elements": int(got.size), "differ": n})
        if n and not failures:
            failures.append(f"tensor '{name}': the trained model (--rounding tflite) and TensorFlow Lite Micro "
                            f"differ in {n} of {got.size} elements")
    if not tensors:
        failures.append("no quantization point of the trained model is held in the .tflite")
    return {"contract": CONTRACT, "passed": not failures, "failures": failures, "compared": len(tensors),
            "elements": sum(t["elements"] for t in tensors), "missing": missing, "tensors": tensors}
