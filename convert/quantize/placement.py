"""Q/DQ placement a runtime imposes: the residual Add that OpenVINO fuses into a convolution.

OpenVINO's CPU plugin runs ``Conv -> Q -> DQ -> Add(·, DQ(skip))`` as one integer convolution
with the Add as a "sum" post-op on its float result, and skips the QuantizeLinear/DequantizeLinear
pair between the Conv and the Add. A file that has the pair therefore computes one network in
onnxruntime (which requantizes there) and another in OpenVINO. Measured on a ResNet-18 W8A8 file
at 32 px (docs/results.md): 30 % of the first residual block's uint8 outputs differed by 1-2 steps,
the differences compounded to 55 % of the classifier's input, and the runtimes agreed on 0.94 of
top-1 decisions. Without the pair both runtimes compute the same network (0.996 agreement;
1.000 on a 73 %-accurate ResNet-18 where the file with the pair gave 0.995); OpenVINO runs it
0.88x as fast at 32 px, 1.03x at 224 px. onnxruntime needs the pair for its integer convolution
(QLinearConv), so only the openvino target's files leave it out. An --act-bits run is trained with
one placement or the other (``finetune --target``, actquant/prepare.py ``residual_conv``).

Where both inputs of an Add come from such Convs (a ResNet block with a downsample branch),
OpenVINO fuses the Add into the Conv it runs last and honours the other one's pair; the file
keeps that one, and leaves the Conv latest in node order (onnxruntime's and OpenVINO's execution
order for these graphs) in float.
"""

from __future__ import annotations

import onnx

from ..names import RESIDUAL_CONV  # noqa: F401 (re-exported)
from .graph import graph_index, set_nodes


def _sole_reader(consumers: dict, name: str):
    readers = consumers.get(name, [])
    return readers[0] if len(readers) == 1 else None


def _quantized_conv_input(name: str, add, producer: dict, consumers: dict):
    """(conv, q) when ``name`` is DQ(Q(Conv output)) read by ``add`` alone, each link read once."""
    dq = producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or _sole_reader(consumers, name) is not add:
        return None
    q = producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear" or _sole_reader(consumers, q.output[0]) is not dq:
        return None
    conv = producer.get(q.input[0])
    if conv is None or conv.op_type != "Conv" or _sole_reader(consumers, q.input[0]) is not q:
        return None
    return conv, q


def float_residual_convs(model: onnx.ModelProto) -> list[str]:
    """Remove, for each Add of two dequantized activations, the Q/DQ pair between the Add and the
    Conv OpenVINO fuses it into (in place). Returns the Conv outputs the Adds now read in float."""
    inits, producer, consumers = graph_index(model)
    position = {n.output[0]: i for i, n in enumerate(model.graph.node)}
    dropped: list[str] = []
    drop_q: set[str] = set()
    for add in model.graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        sources = [producer.get(name) for name in add.input]
        if any(s is None or s.op_type != "DequantizeLinear" or s.input[0] in inits for s in sources):
            continue  # not the sum of two quantized activations (a bias, a constant)
        found = []
        for slot, name in enumerate(add.input):
            hit = _quantized_conv_input(name, add, producer, consumers)
            if hit is not None:
                conv, q = hit
                found.append((position[conv.output[0]], slot, q))
        if not found:
            continue
        _, slot, q = max(found)
        add.input[slot] = q.input[0]
        drop_q.add(q.output[0])
        dropped.append(q.input[0])
    set_nodes(model, [n for n in model.graph.node if n.output[0] not in drop_q
                      and not (n.op_type == "DequantizeLinear" and n.input[0] in drop_q)])
    return dropped
