"""``golden RUN --precision tflite``: golden vectors in TensorFlow Lite's arithmetic, what a firmware
engineer compares a TensorFlow Lite Micro (or CMSIS-NN) device against.

Format: ``golden.npz`` (one int8 array per tensor the .tflite computes, keyed by its tensor name,
NHWC, batch first; the network input first) and ``index.json``::

    {"format": "wnconvert-golden-tflite/1", "inputs": ..., "images": N, "file": <the .tflite>,
     "network_input": <name>, "arithmetic": "tflite-int8 (QuantizeMultiplier, SRDHM, RoundingDivideByPOT)",
     "layers": [ one object per operator output, in execution order:
        {"tensor", "op", "shape", "dtype", "scale", "zero_point", "fused_activation",
         "multiplier": [Q31 integer per channel] or null, "shift": [exponent per channel] or null} ]}

``multiplier``/``shift`` are TFLite's ``QuantizeMultiplier`` of the operator's real rescaling
(CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED: ``s_in·s_w / s_out`` per channel; MEAN: with the
element count folded in; QUANTIZE: ``s_in / s_out``); ADD lists its three (input 1, input 2,
output) with ``left_shift`` 20.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from wnconvert.convert.artifacts import ensure_writable_dir, write_json
from wnconvert.convert.golden import _write_npz
from wnconvert.convert.tflite import arith, reference
from wnconvert.convert.tflite.flatbuf import TFModel, TFOp, parse, read_file

FORMAT = "wnconvert-golden-tflite/1"


def _multipliers(model: TFModel, op: TFOp) -> dict:
    t = model.tensors
    out = t[op.outputs[0]]
    if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        q, s = arith.conv_multipliers(float(t[op.inputs[0]].scale[0]), t[op.inputs[1]].scale, float(out.scale[0]))
        return {"multiplier": [int(v) for v in q], "shift": [int(v) for v in s]}
    if op.op == "ADD":
        p = arith.AddParams(float(t[op.inputs[0]].scale[0]), float(t[op.inputs[1]].scale[0]), float(out.scale[0]))
        return {"multiplier": [p.q1, p.q2, p.q_out], "shift": [p.shift1, p.shift2, p.shift_out],
                "left_shift": arith.ADD_LEFT_SHIFT}
    if op.op == "MEAN":
        x = t[op.inputs[0]]
        q, s = arith.mean_multiplier(float(x.scale[0]), float(out.scale[0]), int(x.shape[1] * x.shape[2]))
        return {"multiplier": [q], "shift": [s]}
    if op.op == "QUANTIZE" and t[op.inputs[0]].dtype == "int8":
        q, s = arith.quantize_multiplier(float(np.float64(t[op.inputs[0]].scale[0]) / np.float64(out.scale[0])))
        return {"multiplier": [q], "shift": [s]}
    return {"multiplier": None, "shift": None}


def golden_tflite(path: Path, x_float: np.ndarray, out_dir: Path, inputs_name: str) -> dict:
    """Run the TFLite-arithmetic reference of the .tflite at ``path`` on ``x_float`` (normalized
    NCHW images, quantized as the file's input says) and write its golden vectors."""
    start = time.perf_counter()
    model = parse(read_file(path), label=str(path))
    in_t = model.tensors[model.inputs[0]]
    x = np.ascontiguousarray(np.asarray(x_float, np.float32).transpose(0, 2, 3, 1))
    if in_t.dtype == "int8":
        x = arith.quantize_float(x, float(in_t.scale[0]), int(in_t.zero_point[0])).astype(np.int8)
    t0 = time.perf_counter()
    env = reference.run(model, x)
    seconds = time.perf_counter() - t0
    order = [model.inputs[0]] + [op.outputs[0] for op in model.ops]
    arrays, layers = {}, []
    for op, i in zip([None] + model.ops, order):
        t = model.tensors[i]
        if t.dtype == "float32":
            continue
        arrays[t.name] = env[i].astype(np.int8)
        layer = {"tensor": t.name, "op": op.op if op else "input", "shape": list(arrays[t.name].shape),
                 "dtype": "int8", "scale": float(t.scale[0]), "zero_point": int(t.zero_point[0]),
                 "fused_activation": reference.ACTIVATIONS.get(int(op.options.get("FusedActivationFunction", 0)))
                 if op else None}
        layers.append(layer | (_multipliers(model, op) if op else {"multiplier": None, "shift": None}))
    out_dir = ensure_writable_dir(Path(out_dir))
    index = {"format": FORMAT, "inputs": inputs_name, "images": len(x), "file": str(path),
             "network_input": model.tensors[model.inputs[0]].name,
             "arithmetic": "tflite-int8 (QuantizeMultiplier, SRDHM, RoundingDivideByPOT)", "layers": layers}
    _write_npz(out_dir / "golden.npz", arrays)
    write_json(out_dir / "index.json", index)
    return {"out_dir": str(out_dir), "files": ["golden.npz", "index.json"], "tensors": len(arrays),
            "images": len(x), "integer_only": True, "not_integer_only": [], "over_2_24": [],
            "int32_overflow": [], "reference_ms_per_image": 1000 * seconds / max(len(x), 1),
            "seconds": time.perf_counter() - start}
