"""int8 / int4 weights with 8-bit activations (W8A8, W4A8): onnxruntime.quantization's
``quant_pre_process`` then ``quantize_static`` in QDQ format, calibrated on the given arrays with
MinMax, Percentile or Entropy.

Activations are asymmetric uint8 by default (``act_type``): with int8 activations this
onnxruntime's CPU provider leaves the residual Adds (and the Convs feeding them) as float ops and a
ResNet-18 file ran 0.4x as fast as fp32, with uint8 about 1.5x faster (docs/results.md). BatchNorm
and the scheme's per-channel scales are folded into the Conv first (``fuse``), a linear layer's
output scale and bias into one Gemm, and no QuantizeLinear is left on the logits (:mod:`.tail`);
for OpenVINO, no Q/DQ pair between a Conv and the residual Add it fuses into it (:mod:`.placement`).
The weights of a ``--weight-bits`` run are then rewritten onto their exact grid (:mod:`.grid`), and
int4 weights moved into int8 containers when asked (:mod:`.container`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from .container import GRID_RANGE, INT4_RANGE, to_int8_container
from .graph import dq_weight_names, set_opset
from .grid import exact_grid_rewrite
from .options import INT_OPSET, QuantOptions, QuantResult
from .placement import float_residual_convs
from .tail import dequantized_outputs, fold_linear_tails


class ArrayReader:
    """An onnxruntime ``CalibrationDataReader`` over an NCHW float32 array, in small batches."""

    def __init__(self, input_name: str, arrays: np.ndarray, batch: int = 16) -> None:
        self.input_name = input_name
        self.arrays = np.ascontiguousarray(arrays, dtype=np.float32)
        self.batch = batch
        self._i = 0

    def get_next(self):
        if self._i >= len(self.arrays):
            return None
        x = self.arrays[self._i:self._i + self.batch]
        self._i += self.batch
        return {self.input_name: x}

    def rewind(self) -> None:
        self._i = 0

    def __len__(self) -> int:
        return (len(self.arrays) + self.batch - 1) // self.batch


def handles(options: QuantOptions) -> bool:
    return options.needs_calibration


def write(src: Path, out: Path, tmp: Path, options: QuantOptions, calib: np.ndarray,
          result: QuantResult) -> None:
    pre = tmp / "pre.onnx"
    try:
        # Shapes inferred; with options.fuses also onnxruntime's basic fusions (BatchNormalization
        # and constant Mul/Add into Conv), without which every BatchNorm stays a float op between
        # a DequantizeLinear and a QuantizeLinear and the int8 file runs slower than fp32.
        quant_pre_process(str(src), str(pre), skip_optimization=not options.fuses)
    except Exception as e:  # symbolic shape inference can fail on exotic graphs; quantize as is
        result.notes.append(f"quant_pre_process skipped: {type(e).__name__}")
        shutil.copy(src, pre)
    model = onnx.load(str(pre))
    if options.fuses and fold_linear_tails(model):  # the classifier: one Gemm (tail.py)
        result.notes.append("linear output scale and bias folded into a Gemm")
    if options.precision == "int4":  # int4 DequantizeLinear is opset 21 (else com.microsoft)
        model = set_opset(model, INT_OPSET)
    onnx.save(model, str(pre))
    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns per tensor on the root logger
    try:
        _quantize_static(pre, out, ArrayReader(name, calib), options)
    finally:
        logging.getLogger().setLevel(level)
    model = onnx.load(str(out))
    dequantized_outputs(model)  # float logits, not a uint8 grid (tail.py)
    if options.residual_conv == "float":  # the runtime fuses the residual Add into the Conv
        floats = float_residual_convs(model)
        result.notes.append(f"{len(floats)} Conv outputs read by a residual Add left in float (placement.py)")
    if options.grid_bits is not None:  # the quantized graph's own weights (BatchNorm folded or not)
        exact_grid_rewrite(model, onnx.load(str(pre)), options, result)
    else:
        result.lossy_weights.extend(dq_weight_names(model))
    if options.precision == "int4" and options.container == "int8":  # the same integers, int8 kernels
        exact = options.grid_bits is not None and not result.lossy_weights  # all on the symmetric grid
        to_int8_container(model, GRID_RANGE if exact else INT4_RANGE)
    onnx.save(model, str(out))


_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}


def _quantize_static(pre: Path, out: Path, reader: ArrayReader, options: QuantOptions) -> None:
    quantize_static(
        str(pre), str(out), reader, quant_format=QuantFormat.QDQ,
        weight_type=QuantType.QInt4 if options.precision == "int4" else QuantType.QInt8,
        activation_type=QuantType.QUInt8 if options.act_type == "uint8" else QuantType.QInt8,
        per_channel=options.per_channel, calibrate_method=_METHODS[options.calibrate_method],
        op_types_to_quantize=["Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Relu",
                              "MaxPool", "GlobalAveragePool", "AveragePool", "Flatten", "Concat",
                              "Reshape", "Transpose", "Sigmoid", "HardSigmoid", "HardSwish",
                              "Clip"],
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": options.act_symmetric,
                       "QuantizeBias": options.quantize_bias})
