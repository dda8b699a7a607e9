"""What a low-precision export is asked for (:class:`QuantOptions`) and what it did (:class:`QuantResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from ..names import ACT_TYPES, CALIBRATORS, DEFAULT_CALIBRATOR, PRECISIONS  # noqa: F401 (re-exported)
from .container import check_container
from .placement import RESIDUAL_CONV

ACT_BITS = (None, 8)
SCALES = ("calibrated", "trained")  # an fp32 file calibrated on data, or a QAT model's own (.trained)
INT_OPSET = 21  # DequantizeLinear with int4 inputs


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserInputError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    return precision


@dataclass(frozen=True)
class QuantOptions:
    precision: str = "int8"
    act_bits: int | None = 8            # None: float activations (weights only)
    per_channel: bool = True            # weight scales per output channel
    calibrate_method: str = DEFAULT_CALIBRATOR
    grid_bits: int | None = None        # weights trained on the symmetric grid of this many bits
    act_type: str = "uint8"             # quantized activations: uint8 (asymmetric) | int8
    fuse: bool | None = None            # fold BatchNorm / scale Muls into Conv first (None: auto)
    act_symmetric: bool = False         # activation zero points 0 (int8) instead of calibrated ones
    quantize_bias: bool = True          # int32 biases (DequantizeLinear of int32) or float ones
    container: str = "int4"             # int4 weights stored as INT4 or as INT8 in [-7, 7] (.container)
    residual_conv: str = "quantized"    # float: no Q/DQ between a Conv and its residual Add (.placement)
    scales: str = "calibrated"          # trained: a QAT model's own integer network (.trained; act_bits None)

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.act_type not in ACT_TYPES:
            raise UserInputError(f"activation type must be one of: {', '.join(ACT_TYPES)}, not {self.act_type!r}")
        check_container(self.container)
        if self.residual_conv not in RESIDUAL_CONV:
            raise UserInputError(f"residual_conv must be one of: {', '.join(RESIDUAL_CONV)}, "
                                 f"not {self.residual_conv!r}")
        if self.scales not in SCALES:
            raise UserInputError(f"scales must be one of: {', '.join(SCALES)}, not {self.scales!r}")
        if self.scales == "trained" and self.act_bits is not None:
            raise UserInputError("a trained network's activation bits are its own; leave act_bits None")
        if self.act_bits not in ACT_BITS:
            raise UserInputError(f"activation bits must be 8 or float, not {self.act_bits!r}")
        if self.calibrate_method not in CALIBRATORS:
            raise UserInputError(f"unknown calibration method {self.calibrate_method!r}; "
                                 f"choose one of: {', '.join(CALIBRATORS)}")
        if self.grid_bits is not None and not 2 <= self.grid_bits <= 8:
            raise UserInputError(f"weight bits must be 2..8, not {self.grid_bits}")

    @property
    def weight_bits(self) -> int:
        return {"int8": 8, "int4": 4}.get(self.precision, 0)

    @property
    def fuses(self) -> bool:
        """Whether BatchNorm and per-channel scales are folded into the Conv before quantizing
        (activation-quantized files, unless ``fuse=False``). A trained grid survives it: each
        channel's folded weights are its grid integers times one factor (see _grid_integers)."""
        return self.needs_calibration and self.fuse is not False

    @property
    def needs_calibration(self) -> bool:
        return self.precision in ("int8", "int4") and self.act_bits is not None and self.scales == "calibrated"


@dataclass
class QuantResult:
    path: Path
    precision: str
    options: QuantOptions
    exact_weights: list[str] = field(default_factory=list)   # written on the trained grid, lossless
    lossy_weights: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trained: Any = None                 # scales="trained": the export's ExportInfo (points, types, container)
    shifts: dict | None = None          # scales="trained", power-of-two: per-layer scale exponents and shifts

    def to_dict(self) -> dict:
        o = self.options
        return {"file": self.path.name, "precision": self.precision,
                "activations": "float" if o.act_bits is None or self.precision == "fp16" else o.act_type,
                "act_symmetric": o.act_symmetric if o.needs_calibration else None,
                "quantized_bias": o.quantize_bias if o.needs_calibration else None,
                "fused": o.fuses,
                "per_channel": o.per_channel, "calibrate_method": o.calibrate_method if o.needs_calibration else None,
                "grid_bits": o.grid_bits, "container": o.container if self.precision == "int4" else None,
                "residual_conv": o.residual_conv if o.needs_calibration else None,
                "exact_weights": len(self.exact_weights),
                "lossy_weights": len(self.lossy_weights), "notes": self.notes}
