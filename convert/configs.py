"""The settings of a conversion, as frozen dataclasses that validate themselves: no torch, onnx or
numpy, so the command line reads their defaults for ``--help`` without loading any of them.

Each is re-exported by the module that acts on it (``schemes.SchemeConfig``, ``fold.FoldConfig``,
``verify.VerifyConfig``, ``quant_check.QuantThresholds``); the names they check come from
:mod:`.names`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UserInputError
from .names import (
    BN_MODES,
    GAIN_MODES,
    GRANULARITIES,
    RANGE_MODES,
    RESIDUAL_CONV,
    SCALE_FORMATS,
    SCALE_GRAD_MODES,
    SCHEME_NAMES,
    WEIGHT_BITS_SCHEMES,
    WEIGHT_RANGES,
)


@dataclass(frozen=True)
class SchemeConfig:
    """How a model is reparametrized; written next to every artifact."""

    scheme: str = "layer-max"
    gain: str = "frozen"
    scale_grad: str = "full"
    exclude: tuple[str, ...] = ()
    skip_depthwise: bool = False
    weight_bits: int | None = None   # fake-quantize N(W) to the symmetric B-bit grid (max schemes)
    weight_range: str = "max"        # learned: the grid's range is a learned clip (convert/clip.py)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEME_NAMES:
            raise UserInputError(
                f"unknown scheme {self.scheme!r}; choose one of: {', '.join(SCHEME_NAMES)}")
        if self.gain not in GAIN_MODES:
            raise UserInputError(f"unknown gain mode {self.gain!r}; choose one of: {', '.join(GAIN_MODES)}")
        if self.scale_grad not in SCALE_GRAD_MODES:
            raise UserInputError(
                f"unknown scale-grad mode {self.scale_grad!r}; choose one of: {', '.join(SCALE_GRAD_MODES)}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.weight_bits is not None:
            bits = self.weight_bits
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                raise UserInputError(f"--weight-bits must be an integer from 2 to 8, not {bits!r}")
            if self.scheme not in WEIGHT_BITS_SCHEMES:
                raise UserInputError(
                    f"--weight-bits needs a scheme with a fixed [-1, 1] range "
                    f"({', '.join(WEIGHT_BITS_SCHEMES)}), not {self.scheme!r}")
        if self.weight_range not in WEIGHT_RANGES:
            raise UserInputError(
                f"unknown --weight-range {self.weight_range!r}; choose one of: {', '.join(WEIGHT_RANGES)}")
        if self.weight_range == "learned" and (self.weight_bits is None or self.scheme not in WEIGHT_BITS_SCHEMES):
            raise UserInputError(
                f"--weight-range learned clips the grid of --weight-bits B under "
                f"{' or '.join(WEIGHT_BITS_SCHEMES)}; "
                + (f"scheme {self.scheme!r} has no grid" if self.scheme not in WEIGHT_BITS_SCHEMES
                   else "give --weight-bits B"))


@dataclass(frozen=True)
class FoldConfig:
    bn: str = "keep"
    granularity: str = "tensor"   # for layers without a scheme and for re-normalization after a BN fold

    def __post_init__(self) -> None:
        if self.bn not in BN_MODES:
            raise UserInputError(f"unknown --bn mode {self.bn!r}; choose one of: {', '.join(BN_MODES)}")
        if self.granularity not in GRANULARITIES:
            raise UserInputError(
                f"unknown granularity {self.granularity!r}; choose one of: {', '.join(GRANULARITIES)}")


@dataclass(frozen=True)
class VerifyConfig:
    rtol: float = 1e-4
    min_cosine: float = 0.99999
    min_top1: float = 1.0
    samples: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.rtol, (int, float)) and self.rtol > 0 and math.isfinite(self.rtol)):
            raise UserInputError(f"--rtol must be a positive number, not {self.rtol!r}")
        for name in ("min_cosine", "min_top1"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and -1 <= v <= 1):
                raise UserInputError(f"--{name.replace('_', '-')} must be a number in [-1, 1], not {v!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise UserInputError(f"--samples must be at least 1, not {self.samples!r}")


@dataclass(frozen=True)
class QuantThresholds:
    """The floors a lossy low-precision file must reach against model.onnx (see quant_check)."""

    min_agreement: float = 0.9   # top-1 agreement with the fp32 model
    min_sqnr_db: float = 10.0    # 10·log10(Σ ref² / Σ (out − ref)²) of the logits

    def __post_init__(self) -> None:
        if not 0 <= self.min_agreement <= 1:
            raise UserInputError(f"--min-agreement must be in [0, 1], got {self.min_agreement}")


def check_act_settings(bits, range_mode: str, scale_format: str, mixed_precision: bool,
                       residual_conv: str) -> None:
    """Refuse activation quantization settings that cannot work together (the checks of
    ``actquant.ActQuantConfig`` and of ``wnconvert.QATConfig``, here without torch)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise UserInputError(f"--act-bits must be an integer from 2 to 8, not {bits!r}")
    if range_mode not in RANGE_MODES:
        raise UserInputError(f"unknown --act-range {range_mode!r}; choose one of: {', '.join(RANGE_MODES)}")
    if scale_format not in SCALE_FORMATS:
        raise UserInputError(f"unknown --scale-format {scale_format!r}; "
                             f"choose one of: {', '.join(SCALE_FORMATS)}")
    po2 = scale_format == "po2"
    if po2 and mixed_precision:
        raise UserInputError("--scale-format po2 promises an integer-only graph; --mixed-precision keeps "
                             "some operations in float: choose one")
    if residual_conv not in RESIDUAL_CONV:
        raise UserInputError(f"residual_conv must be one of: {', '.join(RESIDUAL_CONV)}, not {residual_conv!r}")
    if po2 and residual_conv == "float":
        raise UserInputError("--scale-format po2 promises an integer-only graph; --target openvino keeps "
                             "the convolutions before residual adds in float: choose one")
