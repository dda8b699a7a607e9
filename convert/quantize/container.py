"""Where 4-bit values are stored: ``int4`` (opset-21 INT4/UINT4 tensors) or ``int8`` (the same
integers in INT8/UINT8 tensors, kept on the 4-bit grid).

onnxruntime's CPU provider has no 4-bit convolution kernels: a W4A8 file with INT4 weights runs its
convolutions in float, slower than fp32. With the same integers in an int8 container (weights as
INT8 initializers in [-7, 7], 4-bit activations as 8-bit QuantizeLinear behind a Clip to their
4-bit range) DequantizeLinear gives bit-identical floats and onnxruntime fuses the convolutions
into its int8 kernels (QLinearConv). A file in an int8 container says so in its metadata
(:data:`META_KEY`: the range of its 4-bit weight integers, ``-7,7`` for the symmetric grids
wnconvert writes, ``-8,7`` for the INT4 range onnxruntime's quantizer uses for post-training int4),
and :func:`container_violations` checks that every stored weight integer lies in that range:
nothing else in the file tells a 4-bit-in-int8 weight from an 8-bit one.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UserInputError
from ..names import CONTAINERS

META_KEY = "wnconvert.int8_container_range"   # value: "lo,hi", the range of the 4-bit weight integers
GRID_RANGE = (-7, 7)    # the symmetric 4-bit grid, 2^(4-1) - 1 levels each side
INT4_RANGE = (-8, 7)    # any INT4 value


def check_container(name: str) -> str:
    if name not in CONTAINERS:
        raise UserInputError(f"unknown container {name!r}; choose one of: {', '.join(CONTAINERS)}")
    return name


def mark_int8_container(model: onnx.ModelProto, weight_range: tuple[int, int] = GRID_RANGE) -> None:
    """Record in ``model``'s metadata that its int8 weights hold 4-bit values in ``weight_range``."""
    value = f"{weight_range[0]},{weight_range[1]}"
    helper.set_model_props(model, {p.key: p.value for p in model.metadata_props} | {META_KEY: value})


def container_range(model: onnx.ModelProto) -> tuple[int, int] | None:
    """The range of the 4-bit weight integers a file stores in int8 containers, or None (not
    such a file). A mark that is not a range inside INT4's reads as the grid's, the strictest."""
    value = next((p.value for p in model.metadata_props if p.key == META_KEY), None)
    if value is None:
        return None
    try:
        lo, hi = (int(v) for v in value.split(","))
    except ValueError:
        return GRID_RANGE
    return (lo, hi) if INT4_RANGE[0] <= lo <= hi <= INT4_RANGE[1] else GRID_RANGE


def _dq_weight_inputs(model: onnx.ModelProto) -> list[str]:
    """Initializers read by a DequantizeLinear as its data: weights (and int32 biases)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


def to_int8_container(model: onnx.ModelProto, weight_range: tuple[int, int] = INT4_RANGE) -> int:
    """Retype every INT4 initializer a DequantizeLinear reads (weights and their zero points) to
    INT8, integers unchanged, and mark the file with ``weight_range`` (default INT4's: onnxruntime's
    quantizer writes symmetric int4 weights in [-8, 7]); returns the number of weights retyped."""
    read = set(_dq_weight_inputs(model))
    zero_points = {n.input[2] for n in model.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in read and len(n.input) > 2}
    count = 0
    for init in model.graph.initializer:
        if init.data_type != TensorProto.INT4 or init.name not in read | zero_points:
            continue
        values = numpy_helper.to_array(init).astype(np.int64)
        init.CopyFrom(helper.make_tensor(init.name, TensorProto.INT8, list(values.shape), values.ravel().tolist()))
        count += init.name in read
    mark_int8_container(model, weight_range)
    return count


def container_violations(model: onnx.ModelProto) -> list[str]:
    """For a file marked as holding 4-bit values in int8 containers: every int8 weight read by a
    DequantizeLinear with an integer outside the marked range; [] for any other file."""
    marked = container_range(model)
    if marked is None:
        return []
    lo, hi = marked
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for name in dict.fromkeys(_dq_weight_inputs(model)):
        if inits[name].data_type not in (TensorProto.INT8, TensorProto.INT4):
            continue  # int32 biases, uint8 constants
        w = numpy_helper.to_array(inits[name]).astype(np.int64)
        bad = np.flatnonzero((w.ravel() < lo) | (w.ravel() > hi))
        if bad.size:
            out.append(f"weight {name!r} holds {int(w.ravel()[bad[0]])} ({bad.size} values) outside the "
                       f"4-bit range [{lo}, {hi}] of its int8 container")
    return out


def container_record(model: onnx.ModelProto) -> dict:
    """What report.json says of a file's 4-bit storage."""
    marked = container_range(model)
    if marked is None:
        return {"storage": "int4" if _has_4bit(model) else None}
    return {"storage": "int8", "value_bits": 4, "weight_range": list(marked),
            "violations": container_violations(model)}


def _has_4bit(model: onnx.ModelProto) -> bool:
    four = (TensorProto.INT4, TensorProto.UINT4)
    return any(i.data_type in four for i in model.graph.initializer)
