"""Weights only (``int4``'s default, ``int8`` with ``act_bits=None``): every Conv/ConvTranspose/
Gemm/MatMul weight initializer becomes ``DequantizeLinear(int initializer, scale, zero point 0)``;
activations stay float.

Written with onnx helpers, not ``quantize_static``, because (1) ``quantize_static`` always
quantizes activations too, and (2) its symmetric weight scale is ``2·max|w| / (qmax − qmin)``
(``2/15`` for int4 on a [-1, 1] tensor, ``2/255`` for int8), not the grid step ``1/L`` a
``--weight-bits`` run trained on. When ``grid_bits`` is given and a weight lies on the grid ``k / L``
(``L = 2**(grid_bits-1) − 1``), its scale is exactly ``1/L`` (per tensor, or a per-channel vector
of ``1/L``) and its integers are ``round(w·L)``: lossless. Other weights get the symmetric max
scale ``max|w_c| / qmax``, which is lossy. onnxruntime (ENABLE_EXTENDED and up) rewrites
``DequantizeLinear -> MatMul`` into ``MatMulNBits``, whose default accuracy level quantizes the
activations to int8; the comparisons here run with ``session.qdq_matmulnbits_accuracy_level=0``
(see ``runtime.ort_session``). ``container="int8"`` stores int4 weights as INT8 in [-7, 7]
(:mod:`.container`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .container import mark_int8_container
from .graph import WEIGHT_INPUTS, set_opset
from .options import INT_OPSET, QuantOptions, QuantResult


def _weight_initializers(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """Initializer name -> (op, input index) for the weights of Conv/ConvTranspose/Gemm/MatMul."""
    inits = {i.name for i in model.graph.initializer}
    found: dict[str, tuple[str, int]] = {}
    for node in model.graph.node:
        for idx in WEIGHT_INPUTS.get(node.op_type, ()):
            if idx < len(node.input) and node.input[idx] in inits:
                if node.op_type == "Gemm" and idx == 0:
                    continue  # Gemm's A is the activation in every exported classifier
                found.setdefault(node.input[idx], (node.op_type, idx, node))  # type: ignore[arg-type]
    return found  # type: ignore[return-value]


def _channel_axis(op: str, idx: int, node, ndim: int) -> int | None:
    if ndim < 2:
        return None
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return 1 if group == 1 else None   # grouped: channels span two axes, use one scale
    if op == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if op == "MatMul":
        return ndim - 1 if idx == 1 else None
    return None


def handles(options: QuantOptions) -> bool:
    return options.precision in ("int8", "int4") and options.act_bits is None


def write(src: Path, out: Path, tmp: Path, options: QuantOptions, calib, result: QuantResult) -> None:
    onnx.save(weights_only(onnx.load(str(src)), options, result), str(out))


def weights_only(model: onnx.ModelProto, options: QuantOptions, result: QuantResult) -> onnx.ModelProto:
    bits = options.weight_bits
    qmax = 2 ** (bits - 1) - 1
    dtype = TensorProto.INT4 if bits == 4 and options.container == "int4" else TensorProto.INT8
    grid = 2 ** (options.grid_bits - 1) - 1 if options.grid_bits else None
    if grid is not None and grid > qmax:
        result.notes.append(f"the {options.grid_bits}-bit training grid does not fit in int{bits}; "
                            "weights are requantized (lossy)")
        grid = None
    model = set_opset(model, INT_OPSET)
    weights = _weight_initializers(model)
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes = []
    for name, (op, idx, node) in weights.items():
        init = inits[name]
        w = numpy_helper.to_array(init)
        if w.dtype not in (np.float32, np.float64) or w.size == 0:
            continue
        w64 = w.astype(np.float64)
        axis = _channel_axis(op, idx, node, w.ndim) if options.per_channel else None
        nch = w.shape[axis] if axis is not None else 1
        exact = grid is not None and np.abs(w64).max() <= 1.0 + 1e-6 and \
            np.abs(w64 * grid - np.round(w64 * grid)).max() <= 1e-4
        if exact:
            q = np.round(w64 * grid)
            scale = np.full(nch, 1.0 / grid) if axis is not None else np.asarray(1.0 / grid)
            result.exact_weights.append(name)
        else:
            if axis is not None:
                red = tuple(a for a in range(w.ndim) if a != axis)
                m = np.abs(w64).max(axis=red)
            else:
                m = np.asarray(np.abs(w64).max())
            scale = np.where(m > 0, m / qmax, 1.0)
            shaped = scale if axis is None else scale.reshape([-1 if a == axis else 1 for a in range(w.ndim)])
            q = np.clip(np.round(w64 / shaped), -qmax, qmax)
            result.lossy_weights.append(name)
        qname, sname, zname = f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"
        zshape = [nch] if axis is not None else []
        model.graph.initializer.append(
            helper.make_tensor(qname, dtype, list(w.shape), q.astype(np.int64).ravel().tolist()))
        model.graph.initializer.append(
            numpy_helper.from_array(np.asarray(scale, np.float32).reshape(zshape), sname))
        model.graph.initializer.append(
            helper.make_tensor(zname, dtype, zshape, [0] * (nch if axis is not None else 1)))
        attrs = {"axis": axis} if axis is not None else {}
        new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname, zname], [name],
                                          name=f"{name}_DequantizeLinear", **attrs))
        model.graph.initializer.remove(init)
    if any(op == "MatMul" for op, _, _ in weights.values()):
        result.notes.append("onnxruntime rewrites DequantizeLinear -> MatMul into MatMulNBits, which by "
                            "default quantizes activations to int8; for exact results set session "
                            "option session.qdq_matmulnbits_accuracy_level=0 (as verify does)")
    # the dequantized weights keep the initializers' names, so consumers are untouched
    for vi in list(model.graph.input):
        if vi.name in weights:
            model.graph.input.remove(vi)
    for n in reversed(new_nodes):
        model.graph.node.insert(0, n)
    if bits == 4 and options.container == "int8":
        mark_int8_container(model)
    return model
