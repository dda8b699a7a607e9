"""The exact-grid rewrite: weights a ``--weight-bits B`` run trained on the symmetric grid
``k / L`` (``L = 2**(B-1) − 1``) keep their integers and get the grid's step as scale, even after
``quantize_static`` chose its own ``2·max|w| / (qmax − qmin)`` or BatchNorm was folded into them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import WEIGHT_INPUTS
from .options import QuantOptions, QuantResult


def grid_integers(w: np.ndarray, L: int, qmax: int) -> tuple[np.ndarray, float] | None:
    """``(k, s)`` with integers ``|k| <= qmax`` and ``k·s == w`` up to float rounding, when ``w``
    lies on a symmetric grid of at most ``L`` levels: its step ``s`` is ``max|w| / j`` for the
    largest integer ``j <= L`` on it. ``w`` may be a trained grid ``k/L`` times a factor (BatchNorm
    folded in), so the step is searched; the trained step ``1/L`` is tried first."""
    m = float(np.abs(w).max()) if w.size else 0.0
    if m == 0.0:
        return np.zeros(w.shape, np.int64), 1.0 / L
    steps = ([1.0 / L] if L <= qmax else []) + [m / j for j in range(min(L, qmax), 0, -1)]
    for s in steps:  # the trained step first, then the folded ones, finest first
        k = np.round(w / s)
        if np.abs(k).max() <= qmax and np.abs(w / s - k).max() <= 1e-4:
            return k.astype(np.int64), s
    return None


def exact_grid_rewrite(model: onnx.ModelProto, src: onnx.ModelProto, options: QuantOptions,
                        result: QuantResult) -> None:
    """After ``quantize_static``: every weight whose fp32 original (in ``src``, the graph that was
    quantized) lies on a grid of at most ``L`` levels per scale group (the tensor, or each channel
    of a per-channel scale) gets that grid's step as its scale and the grid's integers: exactly
    ``1/L`` and ``round(w·L)`` for a trained [-1, 1] grid, ``f_c/L`` per channel once BatchNorm
    (factor ``f_c``) is folded in. Otherwise ``quantize_static``'s own scale
    ``2·max|w|/(qmax − qmin)`` would move every weight off the trained grid."""
    L = 2 ** (options.grid_bits - 1) - 1
    qmax = 2 ** (options.weight_bits - 1) - 1
    originals = {i.name: i for i in src.graph.initializer}
    inits = {i.name: i for i in model.graph.initializer}
    weight_inputs = {n.input[1] for n in model.graph.node  # biases and activations stay as they are
                     if n.op_type in WEIGHT_INPUTS and len(n.input) > 1}
    producer = {o: n for n in model.graph.node for o in n.output}
    reader = {n.input[1]: n for n in model.graph.node if n.op_type in WEIGHT_INPUTS and len(n.input) > 2}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits \
                or node.output[0] not in weight_inputs:
            continue
        qname = node.input[0]
        orig = originals.get(qname[:-len("_quantized")]) if qname.endswith("_quantized") else None
        s_init = inits.get(node.input[1])
        zp_init = inits.get(node.input[2]) if len(node.input) > 2 else None
        if orig is None or s_init is None:
            if qname.endswith("_quantized"):
                result.lossy_weights.append(qname)  # a weight we cannot trace: not claimed exact
            continue
        w = numpy_helper.to_array(orig).astype(np.float64)
        scale = numpy_helper.to_array(s_init)
        zp_ok = zp_init is None or not np.any(numpy_helper.to_array(zp_init).astype(np.int64))
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % max(w.ndim, 1)
        groups = ([w] if scale.ndim == 0 else
                  [np.take(w, c, axis=axis) for c in range(w.shape[axis])])
        found = [grid_integers(g, L, qmax) for g in groups] if zp_ok else [None]
        if any(f is None for f in found):
            result.lossy_weights.append(qname)
            continue
        if scale.ndim == 0:
            k, steps = found[0][0], np.float32(found[0][1])
        else:
            k = np.stack([f[0] for f in found], axis=axis)
            steps = np.array([f[1] for f in found], np.float32)
        q_init = inits[qname]
        q_init.CopyFrom(helper.make_tensor(qname, q_init.data_type, list(w.shape), k.ravel().tolist()))
        new_scale = np.asarray(steps, np.float32).reshape(scale.shape)
        s_init.CopyFrom(numpy_helper.from_array(new_scale, s_init.name))
        if node.output[0] in reader:
            requantize_bias(reader[node.output[0]], producer, inits, new_scale)
        result.exact_weights.append(qname)


def requantize_bias(node, producer: dict, inits: dict, w_scale: np.ndarray) -> None:
    """The int32 bias of a QDQ Conv/Gemm ``node`` has scale ``input_scale · weight_scale``;
    onnxruntime fuses the node into QLinearConv only while that holds, so a changed weight scale
    re-scales the bias (its float value unchanged up to the new step's rounding)."""
    x_dq, b_dq = producer.get(node.input[0]), producer.get(node.input[2])
    if x_dq is None or b_dq is None or x_dq.op_type != "DequantizeLinear" \
            or b_dq.op_type != "DequantizeLinear" or b_dq.input[0] not in inits:
        return
    x_scale = numpy_helper.to_array(inits[x_dq.input[1]]).astype(np.float64)
    b_int, b_scale = inits[b_dq.input[0]], inits[b_dq.input[1]]
    value = numpy_helper.to_array(b_int).astype(np.float64) * numpy_helper.to_array(b_scale)
    step = (x_scale * w_scale.astype(np.float64)).astype(np.float32)
    shape = numpy_helper.to_array(b_scale).shape
    step = np.broadcast_to(step, value.shape)
    ints = np.round(value / step).astype(np.int32)
    b_int.CopyFrom(numpy_helper.from_array(ints, b_int.name))
    b_scale.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(step).reshape(shape) if shape
                                             else np.float32(step.flat[0]), b_scale.name))
