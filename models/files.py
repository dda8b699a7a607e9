"""Every file name of a run directory, in one place.

A run directory (``wnconvert finetune --out RUN``) holds::

    manifest.json            what the run is (versioned Manifest, models/run/rundir.py)
    report.json              what was measured (fold certificate, parity, accuracy, verify)
    checkpoint.safetensors   the trained weights (raw W, or the QAT state of an --act-bits run)
    model.onnx               the folded float network (fp32 contract)
    model.<precision>.onnx   the low-precision files ``export --precision`` writes (fp16, int8, int4, ...)
    model.int8.tflite        ``export --target tflite-micro``: the int8 TFLite file (models/run/run_tflite.py)
    metrics.jsonl            the training log, one line per logged step and per epoch
    dynamics.jsonl           --diagnostics records; initial_weights.json their step-0 histograms
    train/last.pt, best.pt   the resumable training checkpoints
    report/                  ``wnconvert report``'s figures and summary
    .lock                    held while a command writes to the run

The training loop (models/train/) writes its part of the directory, the run layer (models/run/)
the rest, so this module sits below both (it imports only convert's torch-free names);
``convert/`` never names a run file (it writes the path it is given).
"""

from __future__ import annotations

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.names import PRECISIONS

MANIFEST = "manifest.json"
REPORT = "report.json"
CHECKPOINT = "checkpoint.safetensors"
ONNX = "model.onnx"
TFLITE = "model.int8.tflite"
METRICS = "metrics.jsonl"
DYNAMICS = "dynamics.jsonl"
INITIAL = "initial_weights.json"
TRAIN_DIR = "train"
LAST = "last.pt"
BEST = "best.pt"
REPORT_DIR = "report"
LOCK = ".lock"


def artifact_name(precision: str) -> str:
    """The run's file for a precision: ``model.onnx`` for fp32, else ``model.<precision>.onnx``."""
    if precision not in PRECISIONS:
        raise UserInputError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    return ONNX if precision == "fp32" else f"model.{precision}.onnx"
