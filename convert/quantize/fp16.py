"""fp16: ``onnxruntime.transformers.float16.convert_float_to_float16`` with float32 inputs and
outputs kept (``keep_io_types``)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from .options import QuantOptions, QuantResult


def handles(options: QuantOptions) -> bool:
    return options.precision == "fp16"


def write(src: Path, out: Path, tmp: Path, options: QuantOptions, calib, result: QuantResult) -> None:
    model = onnx.load(str(src))
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    _topological_sort(model.graph)  # the converter appends its input casts at the end
    onnx.save(model, str(out))


def _topological_sort(graph) -> None:
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                ordered.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a cycle or a missing input: leave the order to the checker
            ordered.extend(rest)
            break
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
