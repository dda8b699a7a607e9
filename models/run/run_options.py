"""What ``wnconvert export --precision P`` and ``wnconvert verify`` are asked for, as plain
dataclasses: no torch, onnx or numpy, so the command line reads their defaults for ``--help``.
They are re-exported by the modules that act on them (:mod:`.run_export`, :mod:`.run_verify`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from wnconvert.convert.configs import QuantThresholds, VerifyConfig
from wnconvert.convert.names import DEFAULT_CALIBRATOR, DEFAULT_TARGET

DEFAULT_CALIB_SAMPLES = 256
CALIB_SPLITS = ("train", "val")


@dataclass(frozen=True)
class PrecisionOptions:
    """The choices of ``export --precision P`` besides P (see convert/quantize)."""

    data: str | None = None
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    calib_split: str = "train"
    act_bits: str | None = None          # "8" | "float"; None: 8 for int8, float for int4
    per_channel: bool | None = None      # None: per channel, except layer-max weights-only files
    calibrate_method: str = DEFAULT_CALIBRATOR
    act_type: str | None = None          # None: the target's
    fuse: bool | None = None
    rtol: float | None = None            # lossless check tolerance (default: the run's)
    target: str = DEFAULT_TARGET         # convert/quantize/targets.py
    container: str | None = None         # int4 | int8: storage of 4-bit values (None: the target's)


@dataclass(frozen=True)
class VerifyRequest:
    """What ``wnconvert verify`` checks and against which thresholds."""

    onnx_file: Path | None = None       # one file instead of the run's
    precision: str | None = None        # one of the run's files
    inputs: Path | None = None          # .npy of normalized inputs; default generated
    config: VerifyConfig = field(default_factory=VerifyConfig)
    data: str | None = None             # images for lossy files (default: the run's data)
    limit: int = 256
    thresholds: QuantThresholds = field(default_factory=QuantThresholds)
    tflite: Path | None = None          # one .tflite alone (default: the run's model.int8.tflite with the rest)
