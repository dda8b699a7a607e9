"""Where 4-bit values are stored: ``int4`` (opset-21 INT4/UINT4 tensors) or ``int8`` (the same
integers in INT8/UINT8 tensors, kept on the 4-bit grid).

onnxruntime's CPU provider has no 4-bit convolution kernels: a W4A8 file with INT4 weights runs its
convolutions in float, slower than fp32. With the same integers in an int8 container (weights as
INT8 initializers in [-7, 7], 4-bit activations as 8-bit QuantizeLinear behind a Clip to their
4-bit range) DequantizeLinear gives bit-identical floats and onnxruntime fuses the convolutions
into its int8 kernels (QLinearConv). A file in an int8 container says so in its metadata
(:data:`META_KEY`: the bits of its values), and :func:`container_violations` checks that every
stored weight integer lies in that range: nothing else in the file tells a 4-bit-in-int8 weight
from an 8-bit one.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UserInputError

CONTAINERS = ("int4", "int8")
META_KEY = "wnconvert.int8_container_bits"   # value: "4" (the bits of the values in int8 tensors)
VALUE_BITS = 4


def check_container(name: str) -> str:
    if name not in CONTAINERS:
        raise UserInputError(f"unknown container {name!r}; choose one of: {', '.join(CONTAINERS)}")
    return name


def grid_limit(bits: int = VALUE_BITS) -> int:
    """The largest integer of the symmetric ``bits``-bit weight grid (7 for 4 bits)."""
    return 2 ** (bits - 1) - 1


def mark_int8_container(model: onnx.ModelProto, bits: int = VALUE_BITS) -> None:
    """Record in ``model``'s metadata that its int8 weights hold ``bits``-bit values."""
    helper.set_model_props(model, {p.key: p.value for p in model.metadata_props} | {META_KEY: str(bits)})


def container_bits(model: onnx.ModelProto) -> int | None:
    """The bits of the values a file stores in int8 containers, or None (not such a file)."""
    value = next((p.value for p in model.metadata_props if p.key == META_KEY), None)
    return int(value) if value is not None and value.isdigit() else None


def _dq_weight_inputs(model: onnx.ModelProto) -> list[str]:
    """Initializers read by a DequantizeLinear as its data: weights (and int32 biases)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


def to_int8_container(model: onnx.ModelProto) -> int:
    """Retype every INT4 initializer a DequantizeLinear reads (weights and their zero points) to
    INT8, integers unchanged, and mark the file; returns the number of weights retyped."""
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
    mark_int8_container(model)
    return count


def container_violations(model: onnx.ModelProto) -> list[str]:
    """For a file marked as holding ``B``-bit values in int8 containers: every int8 weight read
    by a DequantizeLinear outside ``[-(2^(B-1)-1), 2^(B-1)-1]``; [] for any other file."""
    bits = container_bits(model)
    if bits is None:
        return []
    limit = grid_limit(bits)
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for name in dict.fromkeys(_dq_weight_inputs(model)):
        if inits[name].data_type not in (TensorProto.INT8, TensorProto.INT4):
            continue  # int32 biases, uint8 constants
        w = numpy_helper.to_array(inits[name]).astype(np.int64)
        bad = np.flatnonzero(np.abs(w.ravel()) > limit)
        if bad.size:
            out.append(f"weight {name!r} holds {int(w.ravel()[bad[0]])} ({bad.size} values) outside the "
                       f"{bits}-bit range [-{limit}, {limit}] of its int8 container")
    return out


def container_record(model: onnx.ModelProto) -> dict:
    """What report.json says of a file's 4-bit storage."""
    bits = container_bits(model)
    if bits is None:
        return {"storage": "int4" if _has_4bit(model) else None}
    return {"storage": "int8", "value_bits": bits, "weight_range": [-grid_limit(bits), grid_limit(bits)],
            "violations": container_violations(model)}


def _has_4bit(model: onnx.ModelProto) -> bool:
    four = (TensorProto.INT4, TensorProto.UINT4)
    return any(i.data_type in four for i in model.graph.initializer)
