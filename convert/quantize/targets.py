"""Deployment targets: ``export --target T`` names the runtime a file goes to, and the target
names the quantization settings that runtime expects (:class:`TargetPreset`).

* ``ort-cpu`` (default, today's files): uint8 asymmetric activations, onnxruntime's fast CPU path
  (QLinearConv); int32 biases, which onnxruntime fuses into the integer convolution; 4-bit values
  of files with quantized activations (W4A8) in int8 containers (:mod:`.container`): onnxruntime
  has no int4 convolution kernel.
* ``openvino``: OpenVINO's CPU plugin reads QDQ and runs uint8 activations in its integer kernels;
  ort-cpu's settings (measured: the same file with float biases, as OpenVINO's own quantizer NNCF
  writes them, ran 0.35-0.45x as fast in OpenVINO at 32 px; docs/results.md), but no Q/DQ pair
  between a Conv and the residual Add OpenVINO fuses into it (:mod:`.placement`): OpenVINO skips
  that requantization, so a file holding it computes another network in onnxruntime.
  4-bit values in int8 containers too: measured on a ResNet-18 W4A8 file at 32 px, OpenVINO ran the
  int8-container file 3.1-3.2x its fp32 file and the INT4 one 1.0x (docs/results.md).
* ``tensorrt``: TensorRT's explicit quantization: int8 activations, symmetric (zero point 0),
  weights symmetric per output channel (axis 0), float biases, no uint8, opset 13..25; checked
  structurally after export (:mod:`.target_rules`), unverified on real TensorRT (no GPU here).
* ``fixed-point``: the integer file of a run trained with power-of-two activation scales
  (``--act-bits`` with ``po2`` scales): requantization by shift. Any other run is refused. 4-bit
  values stay INT4/UINT4: the file describes the hardware's own 4-bit format.

``container`` applies to int4 files with quantized activations; weights-only int4 files keep INT4
(float activations get no integer kernel from an int8 container) unless ``--container`` says
otherwise. Explicit options (``--act-type``, ``--per-channel/--per-tensor``, ``--container``,
``--opset``) override a preset's
setting; the record (:func:`target_record`) lists which were overridden.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserInputError
from ..names import DEFAULT_TARGET, TARGETS  # noqa: F401 (re-exported; TARGETS names PRESETS' keys)


@dataclass(frozen=True)
class TargetPreset:
    name: str
    runtime: str
    act_type: str = "uint8"              # quantized activations: uint8 | int8
    act_symmetric: bool = False          # zero point 0
    per_channel: bool | None = None      # weight scales; None: wnconvert's default for the scheme
    quantize_bias: bool = True           # int32 bias DequantizeLinear, or float biases
    opsets: tuple[int, int] | None = None  # opsets the runtime documents for these files
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
    weights_only: bool = True            # takes int8/int4 files with float activations
    act_runs: str = "trained"            # --act-bits runs: trained (their file) | po2 | refused
    rules: str | None = None             # structural rules checked after export (target_rules)
    container: str = "int4"              # 4-bit values of W4A8/W4A4 files: int4 | int8 (.container)
    residual_conv: str = "quantized"     # a Conv output read only by a residual Add: quantized |
                                         # float (the runtime fuses the Add into it; .placement)

    def settings(self) -> dict:
        """The quantization settings the preset fixes (those an option may override)."""
        return {"act_type": self.act_type, "act_symmetric": self.act_symmetric,
                "per_channel": self.per_channel, "quantize_bias": self.quantize_bias,
                "container": self.container, "residual_conv": self.residual_conv}


PRESETS = {p.name: p for p in (
    TargetPreset("ort-cpu", "onnxruntime (CPU provider)", container="int8"),
    TargetPreset("openvino", "OpenVINO (CPU plugin)", container="int8", residual_conv="float"),
    TargetPreset("tensorrt", "TensorRT (explicit quantization; unverified here)", act_type="int8",
                 act_symmetric=True, per_channel=True, quantize_bias=False, opsets=(13, 25),
                 precisions=("fp32", "fp16", "int8"), weights_only=False, act_runs="refused",
                 rules="tensorrt"),
    TargetPreset("fixed-point", "fixed-point / low-bit hardware (power-of-two scales)",
                 precisions=("int8", "int4"), act_runs="po2", rules="fixed-point"),
    # not a QDQ file: export --target tflite-micro writes model.int8.tflite (models/run/run_tflite.py)
    TargetPreset("tflite-micro", "TensorFlow Lite Micro (int8 .tflite)", act_type="int8", per_channel=True,
                 precisions=("int8",), weights_only=False),
)}


def get_target(name: str) -> TargetPreset:
    if name not in PRESETS:
        raise UserInputError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    return PRESETS[name]


def check_target_precision(preset: TargetPreset, precision: str, weights_only: bool) -> None:
    """Refuse a precision (or a weights-only file) the target does not take, in one line."""
    if precision not in preset.precisions:
        raise UserInputError(f"--target {preset.name} takes --precision {' | '.join(preset.precisions)}, "
                             f"not {precision}")
    if weights_only and not preset.weights_only and precision in ("int8", "int4"):
        raise UserInputError(f"--target {preset.name} quantizes activations too (explicit int8 Q/DQ); "
                             "--act-bits float (weights only) is not one of its files")


def apply_target(preset: TargetPreset, overrides: dict) -> tuple[dict, list[str]]:
    """The preset's settings with each non-None ``overrides`` value in place, and the overridden
    names (only those whose value differs from the preset's)."""
    settings = preset.settings()
    unknown = set(overrides) - set(settings)
    if unknown:
        raise UserInputError(f"no target setting {sorted(unknown)[0]!r}")
    changed = sorted(k for k, v in overrides.items() if v is not None and v != settings[k])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings, changed


def target_record(preset: TargetPreset, settings: dict, overridden: list[str]) -> dict:
    """What report.json and the manifest record of the target a file was written for."""
    return {"name": preset.name, "runtime": preset.runtime, "settings": settings,
            "overridden": overridden, "rules": preset.rules,
            "opsets": list(preset.opsets) if preset.opsets else None}
