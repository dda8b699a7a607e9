"""An int8 QDQ ONNX file (the run's trained or calibrated integers) translated into a TFLite model
for TensorFlow Lite Micro: the integer graph of :mod:`..intref.graph` (one step per quantized
tensor) becomes TFLite operators, tensor by tensor, keeping every integer and scale:

* NCHW -> NHWC; conv weights OIHW -> OHWI (depthwise: ``[1, KH, KW, C·M]``), per-channel symmetric
  int8 (zero point 0, quantized dimension 0, or 3 for depthwise); int32 biases at ``s_in·s_w``;
* activations per tensor in int8: a uint8 tensor with zero point ``z`` is the int8 tensor with
  zero point ``z - 128`` holding the same integers shifted by 128;
* Relu/Clip bounds fused into the producing operator as TFLite's NONE / RELU / RELU6 /
  RELU_N1_TO_1 when their integer bounds are exactly those; any other clamp is refused;
* ONNX's explicit paddings: SAME or VALID where they are TFLite's, else a PAD operator before
  (a max pool's PAD pads with the zero point: exact only above a ReLU, refused otherwise);
* a grouped (not depthwise) convolution, which TensorFlow Lite Micro lacks, becomes a CONV_2D whose
  weight holds zeros outside each output channel's group: the same integers, ``groups`` times
  the weight's size;
* GlobalAveragePool / spatial ReduceMean -> MEAN; Flatten -> RESHAPE (a fully connected layer
  reading an NHWC flatten gets its weight columns permuted to H, W, C order);
* the logits: the int8 tensor dequantized into the graph output (``--io float``: the graph
  input is float32 through QUANTIZE and the output float32 through DEQUANTIZE).

Tensors are named like the ONNX integer tensors they hold, so the two integer references can be
compared by name. Anything else is refused with :class:`UserInputError` naming the operator.
The operator builders are in :mod:`.ops`, the tensor table they write into in :mod:`.tensors`.
"""

from __future__ import annotations

import onnx

from ..errors import UserInputError
from ..intref.execute import _bounds
from ..intref.graph import Operand, Step, read_steps
from .flatbuf import TFModel, TFTensor
from .ops import OpBuilders
from .tensors import Held, refuse, same_params

__all__ = ["IO_MODES", "Held", "Writer", "qdq_to_tflite"]

IO_MODES = ("int8", "float")


class Writer(OpBuilders):
    def __init__(self, model: onnx.ModelProto, io: str = "int8"):
        if io not in IO_MODES:
            raise UserInputError(f"--io must be one of {', '.join(IO_MODES)}, not {io!r}")
        super().__init__(model, io)

    # -- the graph ------------------------------------------------------------------------------
    def translate(self) -> TFModel:
        for step in read_steps(self.onnx):
            handler = {"input": self._input, "move": self._move, "acc": self._acc}.get(step.kind, self._requant)
            handler(step)
        self._outputs()
        return self.tf

    def _input(self, step: Step) -> None:
        shape = self._graph_input_shape(step.source)
        lo, hi = _bounds(step.out_params, step.clamp)
        if (lo, hi) != (step.out_params.qtype.qmin, step.out_params.qtype.qmax):
            raise refuse(step, "the input is clipped before it is quantized (a narrower input range)")
        nhwc = (1, shape[2], shape[3], shape[1])
        idx, off = self._act_tensor(step.out, nhwc, step.out_params, f"input '{step.out}'")
        if self.io == "float":
            f = self.tf.add(TFTensor(step.source, nhwc, "float32"))
            self._emit("QUANTIZE", [f], [idx])
            self.tf.inputs = [f]
        else:
            self.tf.inputs = [idx]
        self.held[step.out] = Held(idx, off, "nhwc")

    def _graph_input_shape(self, name: str) -> tuple[int, ...]:
        for vi in self.onnx.graph.input:
            if vi.name == name:
                dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
                if len(dims) != 4 or not all(dims[1:]):
                    raise UserInputError(f"graph input '{name}' must be NCHW with fixed C, H, W, not {dims}")
                return tuple(dims)
        raise UserInputError(f"graph input '{name}' not found")

    def _acc(self, step: Step) -> None:
        raise refuse(step, "its output (the logits) is left in float: the int8 file needs quantized "
                     "logits with their own scale")

    def _outputs(self) -> None:
        producers = {o: n for n in self.onnx.graph.node for o in n.output}
        outs = []
        for out in self.onnx.graph.output:
            node = producers.get(out.name)
            src = node.input[0] if node is not None and node.op_type == "DequantizeLinear" else out.name
            if src not in self.held:
                raise UserInputError(f"graph output '{out.name}' is not a dequantized integer tensor")
            held = self.held[src]
            if self.io == "float":
                f = self.tf.add(TFTensor(out.name, self._shape(held.index), "float32"))
                self._emit("DEQUANTIZE", [held.index], [f])
                outs.append(f)
            else:
                outs.append(held.index)
        self.tf.outputs = outs

    def _move(self, step: Step) -> None:
        if step.op == "Concat":
            ins = [Operand(n, step.out_params) for n in step.core.input]
            return self._concat(step, ins)
        held = self.held.get(step.source)
        if held is None:
            raise refuse(step, f"input '{step.source}' is not an integer tensor the writer has placed")
        if step.op == "MaxPool":
            return self._maxpool(step, held)
        return self._reshape(step, held, step.out_params)

    def _requant(self, step: Step) -> None:
        op = step.op
        if op == "Conv":
            return self._conv(step)
        if op in ("Gemm", "MatMul"):
            return self._fc(step)
        if op == "Add":
            return self._add(step)
        if op in ("GlobalAveragePool", "ReduceMean"):
            return self._mean(step)
        if op == "Concat":
            return self._concat(step, step.operands)
        held = self._read(step, step.operands[0])
        same = same_params(step.operands[0].params, step.out_params)
        if op == "MaxPool" and same:
            return self._maxpool(step, held)
        if op in ("Flatten", "Reshape") and same:
            return self._reshape(step, held, step.out_params)
        if op == "AveragePool":
            return self._avgpool(step, held, same)
        raise refuse(step, "no TensorFlow Lite Micro operator in this target's set (CONV_2D, "
                     "DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, MAX_POOL_2D, AVERAGE_POOL_2D, MEAN, PAD, "
                     "RESHAPE, CONCATENATION) computes it" + ("" if same else " with a new scale"))


def qdq_to_tflite(model: onnx.ModelProto, io: str = "int8") -> TFModel:
    """The TFLite model of an int8 QDQ ONNX model (see the module docstring); raises
    :class:`UserInputError` naming the first operator it cannot translate."""
    return Writer(model, io).translate()
