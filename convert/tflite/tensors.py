"""The tensor table of the QDQ ONNX -> TFLite writer (:mod:`.writer`): the int8 TFLite tensor that
stands for each ONNX integer tensor (:class:`Held`), the constants, the fused activations, and the
refusal naming the operator the writer cannot translate."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import UserInputError
from ..intref.execute import _bounds
from ..intref.graph import Operand, QParams, Step
from . import arith
from .flatbuf import TFModel, TFOp, TFTensor

_FUSED = {"NONE": 0, "RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3}


@dataclass
class Held:
    """An int8 TFLite tensor standing for an ONNX integer tensor."""

    index: int
    offset: int  # ONNX integer - TFLite integer (128 for uint8, 0 for int8)
    layout: str  # "nhwc" (4-D), "flat" (2-D, same order as ONNX) or "flat_nhwc" (2-D from an NHWC flatten)
    chw: tuple[int, int, int] | None = None  # flat_nhwc: the (C, H, W) it was flattened from
    floor: int | None = None  # a lower bound of its int8 values (a fused ReLU's), when known


def refuse(step: Step, why: str) -> UserInputError:
    return UserInputError(f"{step.op} node '{step.node}' cannot go to TensorFlow Lite Micro: {why}")


def act_offset(params: QParams, what: str) -> int:
    if params.qtype.name == "uint8":
        return 128
    if params.qtype.name == "int8":
        return 0
    raise UserInputError(f"{what} is {params.qtype.name}: TensorFlow Lite Micro's int8 files take 8-bit "
                         "activations (an --act-bits 8 run, or an fp32 run calibrated to int8)")


class TensorTable:
    """The TFLite model being written and the ONNX integer tensors placed in it so far."""

    def __init__(self, model: onnx.ModelProto, io: str):
        self.onnx = model
        self.io = io
        self.tf = TFModel(description="wnconvert: int8 TFLite from a QDQ ONNX file")
        self.held: dict[str, Held] = {}
        self.expanded: list[str] = []  # grouped convolutions written as dense ones

    # -- tensors --------------------------------------------------------------------------------
    def _act_tensor(self, name: str, shape, params: QParams, what: str) -> tuple[int, int]:
        off = act_offset(params, what)
        t = TFTensor(name, tuple(int(d) for d in shape), "int8", None, np.array([float(params.scale)], np.float32),
                     np.array([int(params.zero_point) - off], np.int64))
        return self.tf.add(t), off

    def _shape(self, index: int) -> tuple[int, ...]:
        return self.tf.tensors[index].shape

    def _read(self, step: Step, op: Operand) -> Held:
        if op.const is not None:
            raise refuse(step, f"input '{op.tensor}' is a constant; only weights and biases may be")
        if op.tensor not in self.held:
            raise refuse(step, f"input '{op.tensor}' is not an integer tensor the writer has placed")
        if op.params.axis is not None:
            raise refuse(step, f"activation '{op.tensor}' is quantized per channel")
        return self.held[op.tensor]

    def _fused(self, step: Step, params: QParams, off: int) -> tuple[int, int | None]:
        """The fused activation whose int8 range is the step's clamp, and the int8 floor it sets."""
        lo, hi = _bounds(params, step.clamp)
        lo8, hi8 = lo - off, hi - off
        z8, s = int(params.zero_point) - off, float(params.scale)
        order = ["RELU", "NONE", "RELU6", "RELU_N1_TO_1"] if step.clamp[0] == 0 else \
            ["NONE", "RELU", "RELU6", "RELU_N1_TO_1"]
        for kind in order:
            if arith.activation_range(kind, s, z8) == (lo8, hi8):
                return _FUSED[kind], lo8
        raise refuse(step, f"its clamp [{step.clamp[0]:g}, {step.clamp[1]:g}] (integers {lo}..{hi}) is none of "
                     "TFLite's fused activations (NONE, RELU, RELU6, RELU_N1_TO_1)")

    def _const(self, name: str, values: np.ndarray, dtype: str, scale=None, axis: int = 0) -> int:
        values = np.ascontiguousarray(values)
        if scale is None:
            return self.tf.add(TFTensor(name, values.shape, dtype, values))
        scale = np.asarray(scale, np.float32).reshape(-1)
        return self.tf.add(TFTensor(name, values.shape, dtype, values, scale, np.zeros(scale.shape, np.int64), axis))

    def _emit(self, op: str, inputs: list[int], outputs: list[int], options: dict | None = None) -> None:
        self.tf.ops.append(TFOp(op, inputs, outputs, options or {}))

    def _zp(self, held: Held) -> int:
        return int(self.tf.tensors[held.index].zero_point[0])


def same_params(a: QParams, b: QParams) -> bool:
    return a.qtype == b.qtype and np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point)


def weight_values(step: Step, op: Operand, channel_axis: int) -> np.ndarray:
    if op.const is None:
        raise refuse(step, f"weight '{op.tensor}' is not a constant")
    if op.params.qtype.name != "int8":
        raise refuse(step, f"weight '{op.tensor}' is {op.params.qtype.name}: the int8 file takes int8 weights "
                     "(export --target tflite-micro from an 8-bit run)")
    if np.any(op.params.zero_point != 0):
        raise refuse(step, f"weight '{op.tensor}' has a non-zero zero point (TFLite's weights are symmetric)")
    if op.params.axis is not None and op.params.axis % op.const.ndim != channel_axis:
        raise refuse(step, f"weight '{op.tensor}' is quantized per channel on axis {op.params.axis}, not on its "
                     f"output-channel axis {channel_axis}")
    return op.const
