"""Structural rules a file must follow for a deployment target, checked on the ONNX graph alone.

``tensorrt``: what TensorRT's ONNX parser accepts for explicit quantization (TensorRT cannot run
here, so these rules are unverified on real TensorRT: a conforming file may still hit a parser or
builder limit):

- Q/DQ in signed int8 only, symmetric: every zero point is int8 and 0 (the parser refuses others:
  "TRT only supports symmetric quantization"); no uint8 tensor anywhere (a QuantizeLinear without
  a zero point produces uint8, so it is refused too).
- weights int8 in [-127, 127]; a Conv weight per output channel (1-D scale, one per channel, the
  ``axis`` attribute 0 present: ONNX's default axis is 1); activations one scale per tensor.
- no DequantizeLinear of int32 (quantized biases): the parser takes activation types only there.
- the default domain's opset in 13..25 (per-axis Q/DQ from 13; TensorRT 10's parser up to 25).

``fixed-point``: every activation QuantizeLinear's scale is a power of two (requantization by
shift).

Any target: a file marked as holding 4-bit values in int8 containers has every stored weight
integer in the 4-bit range [-7, 7] (:func:`.container.container_violations`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .container import container_record, container_violations
from .graph import opset_of

TENSORRT_OPSETS = (13, 25)
INT8_WEIGHT_MIN = -127


def _axis(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _uint8_tensors(model: onnx.ModelProto) -> list[str]:
    g = model.graph
    names = [i.name for i in g.initializer if i.data_type == TensorProto.UINT8]
    names += [v.name for v in list(g.input) + list(g.output) + list(g.value_info)
              if v.type.tensor_type.elem_type == TensorProto.UINT8]
    for node in g.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.UINT8 for a in node.attribute):
            names.append(node.output[0])
        if node.op_type == "QuantizeLinear" and len(node.input) < 3:
            names.append(node.output[0])  # no zero point: uint8 output
    return sorted(set(names))


def _zero_point_violations(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> list[str]:
    if len(node.input) < 3 or not node.input[2]:
        return []
    zp = inits.get(node.input[2])
    if zp is None:
        return [f"{_name(node)}: zero point {node.input[2]!r} is not a constant"]
    if zp.dtype != np.int8:
        return [f"{_name(node)}: zero point is {zp.dtype}, TensorRT needs int8"]
    if np.any(zp != 0):
        return [f"{_name(node)}: zero point {zp.ravel()[:4].tolist()} is not 0 (TensorRT is symmetric only)"]
    return []


def _weight_violations(node: onnx.NodeProto, consumers: dict, inits: dict[str, np.ndarray]) -> list[str]:
    """A DequantizeLinear of an initializer (a weight)."""
    w, scale = inits[node.input[0]], inits.get(node.input[1])
    out = []
    if w.dtype == np.int8 and w.size and int(w.min()) < INT8_WEIGHT_MIN:
        out.append(f"{_name(node)}: int8 weight holds -128; TensorRT's weights lie in [-127, 127]")
    for consumer, idx in consumers.get(node.output[0], []):
        if consumer.op_type == "Conv" and idx == 1:
            channels = w.shape[0] if w.ndim else 0
            if scale is None or scale.ndim != 1 or scale.size != channels or _axis(node) != 0:
                out.append(f"{_name(node)}: Conv weight {node.input[0]!r} is not quantized per output "
                           f"channel (axis 0, {channels} scales)")
    return out


def tensorrt_violations(model: onnx.ModelProto) -> list[str]:
    """Every way ``model`` breaks the TensorRT rules (module docstring); [] when it conforms."""
    out = []
    opset, (lo, hi) = opset_of(model), TENSORRT_OPSETS
    if opset is None or not lo <= opset <= hi:
        out.append(f"opset {opset} outside TensorRT's documented range {lo}..{hi}")
    out += [f"{n}: uint8 tensor (TensorRT quantizes to int8 only)" for n in _uint8_tensors(model)]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for idx, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, idx))
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        data = inits.get(node.input[0])
        if node.op_type == "DequantizeLinear" and data is not None and data.dtype == np.int32:
            out.append(f"{_name(node)}: DequantizeLinear of int32 (a quantized bias); TensorRT takes float biases")
            continue
        out += _zero_point_violations(node, inits)
        if node.op_type == "DequantizeLinear" and data is not None:
            out += _weight_violations(node, consumers, inits)
        elif inits.get(node.input[1]) is not None and inits[node.input[1]].size != 1:
            out.append(f"{_name(node)}: activation quantized per axis; TensorRT takes one scale per tensor")
    return out


def fixed_point_violations(model: onnx.ModelProto) -> list[str]:
    """Every QuantizeLinear / DequantizeLinear (activations and weights, per tensor or per axis)
    with a scale that is not a constant power of two (checked on its float bits)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = inits.get(node.input[1])
        if scale is None:
            out.append(f"{_name(node)}: scale {node.input[1]!r} is not a constant")
            continue
        mantissa, _ = np.frexp(scale.astype(np.float64).ravel())
        bad = np.flatnonzero(mantissa != 0.5)
        if bad.size:
            what = "weight" if node.input[0] in inits else "activation"
            out.append(f"{_name(node)}: {what} scale {float(scale.ravel()[bad[0]]):.6g} is not a power of two")
    return out


RULES = {"tensorrt": tensorrt_violations, "fixed-point": fixed_point_violations}


def check_file(path: Path, rules: str | None) -> dict:
    """The structural check of ``path`` as report.json records it: the target's ``rules``, the
    storage of its 4-bit values (``container``), whether it passed and every violation."""
    model = onnx.load(str(path))
    violations = container_violations(model) + (RULES[rules](model) if rules else [])
    return {"rules": rules, "passed": not violations, "violations": violations,
            "container": container_record(model)}
