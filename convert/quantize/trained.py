"""The trained integer network of a QAT model: what ``export --precision int8|int4`` writes for an
``--act-bits`` run and :func:`wnconvert.export` for a model prepared in a user's own script.

Its source is the model itself (:class:`TrainedNetwork`), not an fp32 file: every scale, zero point
and weight grid is the one trained, so nothing is calibrated (``QuantOptions(scales="trained")``).
The QDQ graph is written by :func:`convert.actquant.deploy.write_deployed` (imported when a file is
written: it needs torch); power-of-two runs are checked to hold only power-of-two scales there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .options import QuantOptions, QuantResult


@dataclass(frozen=True)
class TrainedNetwork:
    """A model prepared for activation quantization (``actquant.prepare_qat``), in eval mode, and the
    NCHW shape of one example input (batch 1; the file's batch is dynamic)."""

    model: Any
    example_shape: tuple[int, ...]


def handles(options: QuantOptions) -> bool:
    return options.scales == "trained"


def write(src: TrainedNetwork, out: Path, tmp: Path, options: QuantOptions, calib, result: QuantResult) -> None:
    from ..actquant.deploy import write_deployed

    if not isinstance(src, TrainedNetwork):
        raise TypeError(f"trained scales are written from a TrainedNetwork, not {type(src).__name__}")
    result.trained, result.shifts = write_deployed(src.model, out, example_shape=src.example_shape,
                                                   container=options.container)
