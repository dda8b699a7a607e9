"""onnxruntime's integers at the quantization points of a QDQ file written by :func:`~.export_qdq`.

Each point ``P`` is the tensor ``P_q``, the output of the node ``Q_P`` (or of the integer Clip
``Clip_P`` that follows it, for points below 8 bits stored in 8); the file is instrumented once with those
tensors as extra graph outputs (a 4-bit one read through a ``Cast`` to int8: onnxruntime hands no
4-bit tensor to numpy) and run by one session per optimization level. The integers returned are
the stored values minus the zero point, the ``k`` of ``k * s``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ..errors import ParityError, UserInputError
from ..reading import load_onnx

FOUR_BIT = (TensorProto.INT4, TensorProto.UINT4)


def _session(model: onnx.ModelProto, optimized: bool):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types: a file it cannot load
        raise UserInputError(f"onnxruntime cannot load the QDQ file: {str(e).strip().splitlines()[0][:300]}") from None


def _point_quantizers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Each quantized tensor -> the QuantizeLinear that sets its zero point: its own producer, or
    for the output of an integer Clip (``Q -> Clip -> DQ``, export_qdq) the Clip's QuantizeLinear."""
    q_nodes = {n.output[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for n in model.graph.node:
        if n.op_type == "Clip" and n.input[0] in q_nodes:
            q_nodes[n.output[0]] = q_nodes[n.input[0]]
    return q_nodes


class OrtPoints:
    """One instrumented session of ``onnx_path`` reading the integers at ``points``;
    ``missing`` lists the points the file has no ``Q_<point>`` output for."""

    def __init__(self, onnx_path: Path, points: list[str], optimized: bool,
                 model: onnx.ModelProto | None = None) -> None:
        # the file is under a contract: unreadable is a parity failure (exit 3), never an internal error
        model = onnx.ModelProto.FromString(model.SerializeToString()) if model is not None else \
            load_onnx(onnx_path, error=ParityError)
        inits = {i.name: i for i in model.graph.initializer}
        q_nodes = _point_quantizers(model)
        self.zero: dict[str, int] = {}
        self.missing = [p for p in points if f"{p}_q" not in q_nodes]
        self.points = [p for p in points if p not in self.missing]
        names = []
        for p in self.points:
            node, name = q_nodes[f"{p}_q"], f"{p}_q"
            zp = inits.get(node.input[2]) if len(node.input) > 2 else None
            self.zero[p] = int(numpy_helper.to_array(zp)) if zp is not None else 0
            if zp is not None and zp.data_type in FOUR_BIT:
                model.graph.node.append(helper.make_node("Cast", [name], [f"{name}_read"], to=TensorProto.INT8))
                name = f"{name}_read"
            names.append(name)
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
        self.logits = model.graph.output[0].name
        self.wanted = [self.logits] + names
        self.session = _session(model, optimized)

    def run(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``({point: k as int64}, logits)`` on the float NCHW images ``x``."""
        res = self.session.run(self.wanted, {"input": np.ascontiguousarray(x, np.float32)})
        ints = {p: r.astype(np.int64) - self.zero[p] for p, r in zip(self.points, res[1:])}
        return ints, res[0]


def ort_point_integers(onnx_path: Path, points: list[str], x: np.ndarray, optimized: bool) -> tuple[dict, np.ndarray]:
    """onnxruntime's integers at every point present in the file (``Q_<point>`` outputs) and its logits."""
    return OrtPoints(Path(onnx_path), points, optimized).run(x)
