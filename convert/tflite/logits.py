"""Calibrated int8 logits for a QDQ file whose classifier output is left in float.

onnxruntime's static quantization (``export --precision int8`` of an fp32 run) leaves the last
Gemm's output float: its runtime dequantizes the int32 accumulator. TFLite's int8 file needs the
logits as int8 with their own scale, as a trained ``--act-bits`` run has them. This inserts
``QuantizeLinear -> DequantizeLinear`` on each float graph output, the int8 range calibrated on the
calibration images' logits (min/max, zero included, asymmetric), so the integer graph ends in
quantized logits; nothing else changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime import ort_session, run_batches, session_runner


def int8_range(lo: float, hi: float) -> tuple[np.float32, np.int8]:
    """Scale and zero point mapping ``[min(lo, 0), max(hi, 0)]`` onto int8's 256 steps."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / 255.0 if hi > lo else 1.0)
    zp = int(np.clip(np.rint(-128 - lo / float(scale)), -128, 127))
    return scale, np.int8(zp)


def quantize_logits(path: Path, calib: np.ndarray) -> list[str]:
    """Rewrite ``path`` in place with its float graph outputs quantized (see the module
    docstring); returns the names of the outputs it quantized (empty: already integer)."""
    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}
    todo = [o.name for o in model.graph.output
            if o.name in producers and producers[o.name].op_type != "DequantizeLinear"]
    if not todo:
        return []
    logits = run_batches(session_runner(ort_session(path)), np.asarray(calib, np.float32))
    for name in todo:
        scale, zp = int8_range(logits.min(), logits.max())
        node = producers[name]
        raw, q = f"{name}_float", f"{name}_q"
        node.output[list(node.output).index(name)] = raw
        model.graph.initializer.extend([numpy_helper.from_array(np.asarray(scale), f"{name}_scale"),
                                        helper.make_tensor(f"{name}_zero_point", TensorProto.INT8, [], [int(zp)])])
        model.graph.node.extend([
            helper.make_node("QuantizeLinear", [raw, f"{name}_scale", f"{name}_zero_point"], [q], name=q),
            helper.make_node("DequantizeLinear", [q, f"{name}_scale", f"{name}_zero_point"], [name],
                             name=f"{name}_dq")])
    onnx.save(model, str(path))
    return todo
