"""Every low-precision ONNX file: fp16, int8 (QDQ) and int4 (QDQ, opset 21), from an fp32 ONNX file
calibrated on data, or from a QAT model with its trained scales.

Knows nothing of schemes or runs: it takes the source (the fp32 path, or a
:class:`.trained.TrainedNetwork`), calibration arrays (already preprocessed, NCHW float32), the
precision and options. One module per format, each with ``handles(options)`` and
``write(src, out, tmp, options, calib, result)``; :data:`FORMATS` lists them in the order they are
asked, and a new format is a new module added there:

* :mod:`.trained`: a QAT model's own integer network (``scales="trained"``): its scales, zero
  points and weight grids, 2..8-bit activations, no calibration.
* :mod:`.fp16`: ``convert_float_to_float16``, float32 inputs and outputs kept.
* :mod:`.weights_only`: hand-written QDQ weights, float activations (``int4``'s default, ``int8``
  with ``act_bits=None``); a ``--weight-bits`` run's grid is kept exactly.
* :mod:`.static`: ``quantize_static`` with 8-bit activations (W8A8, W4A8), BatchNorm folded first
  and the classifier made one Gemm with float logits (:mod:`.tail`), then the exact-grid rewrite
  (:mod:`.grid`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ..artifacts import ensure_writable_dir
from ..errors import UserInputError
from ..metrics import compare_logits
from ..runtime import run_onnx
from . import fp16, static, trained, weights_only
from .container import CONTAINERS  # noqa: F401 (public)
from .graph import WEIGHT_INPUTS, opset_of, weight_storage  # noqa: F401 (public)
from .options import ACT_BITS, ACT_TYPES, CALIBRATORS, INT_OPSET, PRECISIONS, QuantOptions, QuantResult, check_precision  # noqa: F401 (public)
from .static import ArrayReader  # noqa: F401 (public)
from .trained import TrainedNetwork  # noqa: F401 (public)

FORMATS = (trained, fp16, weights_only, static)


def quantize(src: Path | TrainedNetwork, dst: Path, options: QuantOptions, calib: np.ndarray | None = None,
             check: Callable[[Path], None] | None = None) -> QuantResult:
    """Write the ``options.precision`` file of ``src`` (the fp32 ONNX path, or a trained network
    with ``options.scales == "trained"``) to ``dst`` (atomically); ``check`` (raising to refuse
    the file) sees the written file before it replaces ``dst``."""
    dst = Path(dst)
    if options.scales == "calibrated":
        src = Path(src)
        _check_fp32_source(src, options, calib)
    fmt = next(f for f in FORMATS if f.handles(options))
    result = QuantResult(dst, options.precision, options)
    ensure_writable_dir(dst.parent)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=dst.parent) as tmp:
        out = Path(tmp) / dst.name
        fmt.write(src, out, Path(tmp), options, calib, result)
        onnx.checker.check_model(str(out))
        if check is not None:
            check(out)
        shutil.move(str(out), str(dst))
    if result.trained is not None:
        result.trained.path = dst
    return result


def _check_fp32_source(src: Path, options: QuantOptions, calib: np.ndarray | None) -> None:
    if not src.exists():
        raise UserInputError(f"{src} does not exist")
    if options.precision == "fp32":
        raise UserInputError("fp32 is the exported float file itself; nothing to quantize")
    if options.needs_calibration and (calib is None or len(calib) == 0):
        raise UserInputError(f"--precision {options.precision} with int8 activations needs calibration "
                             "data: pass --data SPEC (or weights only: --act-bits float)")
    opset = opset_of(onnx.load(str(src), load_external_data=False))
    if options.per_channel and options.precision in ("int8", "int4") and opset is not None and opset < 13:
        raise UserInputError(f"per-channel weights need opset 13 or more (per-axis DequantizeLinear); {src.name} "
                             f"has opset {opset}: export it with --opset 13 or more, or use --per-tensor")


def compare_files(fp32_path: Path, quant_path: Path, x: np.ndarray) -> dict:
    return compare_logits(run_onnx(fp32_path, x), run_onnx(quant_path, x))
