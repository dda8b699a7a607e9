"""Is a low-precision ONNX file still the model it was made from?

Two contracts, depending on how the file was made:

* **lossless** (a ``--weight-bits B`` run exported weights-only at ``B`` or more bits, so every
  stored integer times its scale is the trained weight): the file must agree with the *trained
  model* within the fp32 tolerance, exactly like ``model.onnx`` (see :func:`verify.verify`).
* **lossy** (fp16, W8A8, post-training int4, ...): it is compared with the fp32 ``model.onnx`` on
  the same inputs, run with onnxruntime's graph optimizations off and on: top-1 agreement and the SQNR of the logits
  must reach the thresholds below.
  They are floors that catch a broken artifact (wrong scales, saturated activations), not accuracy
  targets; accuracy is what ``wnconvert eval`` measures on real data.

Knows nothing of schemes: whether a file is lossless is told by the caller.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
from onnx import TensorProto

from .configs import QuantThresholds  # noqa: F401 (re-exported)
from .metrics import compare_logits
from .reading import load_onnx
from .runtime import run_onnx

_INT_TYPES = {TensorProto.INT4: "int4", TensorProto.UINT4: "int4",
              TensorProto.INT8: "int8", TensorProto.UINT8: "int8"}


def detect_precision(path: Path) -> str:
    """fp32 | fp16 | int8 | int4 from the file's contents: the narrowest integer type feeding a
    DequantizeLinear, else fp16 when any initializer is float16."""
    model = load_onnx(path, external_data=False)  # reading.py: regular file, bounded, one line
    inits = {i.name: i.data_type for i in model.graph.initializer}
    found = {_INT_TYPES[inits[n.input[0]]] for n in model.graph.node
             if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) in _INT_TYPES}
    if found:
        return "int4" if "int4" in found else "int8"
    return "fp16" if TensorProto.FLOAT16 in inits.values() else "fp32"


def check_lossy(fp32_path: Path, path: Path, x: np.ndarray, thresholds: QuantThresholds) -> dict:
    """Compare ``path`` with ``fp32_path`` on ``x``, running ``path`` in onnxruntime with graph
    optimizations off (the file as written) and on (what a deployment runs: QDQ pairs become
    integer kernels that round differently). Both must meet the thresholds; ``vs_fp32`` is the
    worse of the two."""
    ref = run_onnx(fp32_path, x)
    runs = {level: compare_logits(ref, run_onnx(path, x, optimized=(level == "on")))
            for level in ("off", "on")}
    failures = []
    for level, c in runs.items():
        where = f" (optimizations {level})"
        if not np.isfinite(c["max_abs"]):
            failures.append("non-finite logits" + where)
        if c["top1_agreement"] < thresholds.min_agreement:
            failures.append(f"top-1 agreement {c['top1_agreement']:.4f} < {thresholds.min_agreement:g}{where}")
        if c["sqnr_db"] < thresholds.min_sqnr_db:
            failures.append(f"SQNR {c['sqnr_db']:.1f} dB < {thresholds.min_sqnr_db:g} dB{where}")
    worse = min(runs.values(), key=lambda c: (c["sqnr_db"], c["top1_agreement"]))
    return {"contract": "lossy", "vs_fp32": worse, "by_optimization": runs,
            "thresholds": asdict(thresholds), "failures": failures, "passed": not failures}
