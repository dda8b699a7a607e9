"""What a file under a contract (lossless-activations, bit-exact) may contain: the operations
:func:`~.export_qdq.export_qdq` writes, and logits written by the DequantizeLinear of the last
quantization point (or by the classifier's Gemm where its output has no point).

Anything else (an operation the export never writes, an operation inserted after the last
point) means the file is not the trained network: a parity failure (exit 3) naming the node,
not a refusal of the input."""

from __future__ import annotations

import onnx

# every op_type export_qdq emits (graph_ops' passthrough ops included)
EXPORT_OPS = frozenset({
    "Add", "AveragePool", "Cast", "Clip", "Concat", "Conv", "DequantizeLinear", "Div", "Erf", "Flatten",
    "Gemm", "GlobalAveragePool", "HardSigmoid", "HardSwish", "MaxPool", "Mul", "QuantizeLinear", "Relu",
    "Reshape", "Sigmoid", "Tanh",
})


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"


def unexpected_nodes(model: onnx.ModelProto, last_point: str | None) -> list[str]:
    """Failures: nodes whose operation the export never writes, and the logits not written by
    ``DQ_<last_point>`` (when the model's output is a point's) or by a Gemm."""
    out = [f"unexpected {_label(n)}: the export of a trained network writes no {n.op_type}"
           for n in model.graph.node if n.op_type not in EXPORT_OPS or n.domain not in ("", "ai.onnx")]
    if not model.graph.output:
        return out + ["the file has no output"]
    logits = model.graph.output[0].name
    producer = next((n for n in model.graph.node if logits in n.output), None)
    if producer is None:
        return out + [f"no node writes the output {logits!r}"]
    if last_point is not None:
        ok = producer.op_type == "DequantizeLinear" and list(producer.input[:1]) == [f"{last_point}_q"]
        want = f"the DequantizeLinear of the last quantization point {last_point!r}"
    else:
        ok, want = producer.op_type == "Gemm", "the classifier's Gemm"
    if not ok:
        out.append(f"unexpected {_label(producer)} writes the logits, after the last quantization point "
                   f"(the export writes them with {want})")
    return out
