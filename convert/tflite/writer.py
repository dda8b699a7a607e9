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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import UserInputError
from ..intref.execute import _bounds
from ..intref.graph import Operand, QParams, Step, read_steps
from . import arith
from .flatbuf import TFModel, TFOp, TFTensor
from .reference import SAME, VALID, same_padding

IO_MODES = ("int8", "float")
_FUSED = {"NONE": 0, "RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3}


@dataclass
class Held:
    """An int8 TFLite tensor standing for an ONNX integer tensor."""

    index: int
    offset: int  # ONNX integer - TFLite integer (128 for uint8, 0 for int8)
    layout: str  # "nhwc" (4-D), "flat" (2-D, same order as ONNX) or "flat_nhwc" (2-D from an NHWC flatten)
    chw: tuple[int, int, int] | None = None  # flat_nhwc: the (C, H, W) it was flattened from
    floor: int | None = None  # a lower bound of its int8 values (a fused ReLU's), when known


def _refuse(step: Step, why: str) -> UserInputError:
    return UserInputError(f"{step.op} node '{step.node}' cannot go to TensorFlow Lite Micro: {why}")


def _offset(params: QParams, what: str) -> int:
    if params.qtype.name == "uint8":
        return 128
    if params.qtype.name == "int8":
        return 0
    raise UserInputError(f"{what} is {params.qtype.name}: TensorFlow Lite Micro's int8 files take 8-bit "
                         "activations (an --act-bits 8 run, or an fp32 run calibrated to int8)")


class Writer:
    def __init__(self, model: onnx.ModelProto, io: str = "int8"):
        if io not in IO_MODES:
            raise UserInputError(f"--io must be one of {', '.join(IO_MODES)}, not {io!r}")
        self.onnx = model
        self.io = io
        self.tf = TFModel(description="wnconvert: int8 TFLite from a QDQ ONNX file")
        self.held: dict[str, Held] = {}
        self.expanded: list[str] = []  # grouped convolutions written as dense ones

    # -- tensors --------------------------------------------------------------------------------
    def _act_tensor(self, name: str, shape, params: QParams, what: str) -> tuple[int, int]:
        off = _offset(params, what)
        t = TFTensor(name, tuple(int(d) for d in shape), "int8", None, np.array([float(params.scale)], np.float32),
                     np.array([int(params.zero_point) - off], np.int64))
        return self.tf.add(t), off

    def _shape(self, index: int) -> tuple[int, ...]:
        return self.tf.tensors[index].shape

    def _read(self, step: Step, op: Operand) -> Held:
        if op.const is not None:
            raise _refuse(step, f"input '{op.tensor}' is a constant; only weights and biases may be")
        if op.tensor not in self.held:
            raise _refuse(step, f"input '{op.tensor}' is not an integer tensor the writer has placed")
        if op.params.axis is not None:
            raise _refuse(step, f"activation '{op.tensor}' is quantized per channel")
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
        raise _refuse(step, f"its clamp [{step.clamp[0]:g}, {step.clamp[1]:g}] (integers {lo}..{hi}) is none of "
                      "TFLite's fused activations (NONE, RELU, RELU6, RELU_N1_TO_1)")

    def _const(self, name: str, values: np.ndarray, dtype: str, scale=None, axis: int = 0) -> int:
        values = np.ascontiguousarray(values)
        if scale is None:
            return self.tf.add(TFTensor(name, values.shape, dtype, values))
        scale = np.asarray(scale, np.float32).reshape(-1)
        return self.tf.add(TFTensor(name, values.shape, dtype, values, scale, np.zeros(scale.shape, np.int64), axis))

    def _emit(self, op: str, inputs: list[int], outputs: list[int], options: dict | None = None) -> None:
        self.tf.ops.append(TFOp(op, inputs, outputs, options or {}))

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
            raise _refuse(step, "the input is clipped before it is quantized (a narrower input range)")
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
        raise _refuse(step, "its output (the logits) is left in float: the int8 file needs quantized "
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
            raise _refuse(step, f"input '{step.source}' is not an integer tensor the writer has placed")
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
        same = _same(step.operands[0].params, step.out_params)
        if op == "MaxPool" and same:
            return self._maxpool(step, held)
        if op in ("Flatten", "Reshape") and same:
            return self._reshape(step, held, step.out_params)
        if op == "AveragePool":
            return self._avgpool(step, held, same)
        raise _refuse(step, "no TensorFlow Lite Micro operator in this target's set (CONV_2D, "
                      "DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, MAX_POOL_2D, AVERAGE_POOL_2D, MEAN, PAD, "
                      "RESHAPE, CONCATENATION) computes it" + ("" if same else " with a new scale"))

    # -- spatial ops ----------------------------------------------------------------------------
    def _spatial(self, step: Step, held: Held, kernel) -> tuple[Held, int, tuple]:
        """Padding of a conv/pool input: (input, SAME|VALID, (oh, ow)); a PAD operator when
        ONNX's pads are neither."""
        a = step.attrs
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise _refuse(step, "auto_pad is not supported")
        if a.get("ceil_mode", 0):
            raise _refuse(step, "ceil_mode is not supported")
        if held.layout != "nhwc":
            raise _refuse(step, "its input is not a 4-D image tensor")
        _, h, w, c = self._shape(held.index)
        kh, kw = kernel
        sh, sw = a.get("strides", (1, 1))
        dh, dw = a.get("dilations", (1, 1))
        t, left, b, r = a.get("pads", (0, 0, 0, 0))
        oh = (h + t + b - ((kh - 1) * dh + 1)) // sh + 1
        ow = (w + left + r - ((kw - 1) * dw + 1)) // sw + 1
        if (t, left, b, r) == (0, 0, 0, 0):
            return held, VALID, (oh, ow)
        same_h, same_w = same_padding(h, kh, sh, dh, SAME), same_padding(w, kw, sw, dw, SAME)
        if same_h == (oh, t, b) and same_w == (ow, left, r):
            return held, SAME, (oh, ow)
        if step.op == "MaxPool" and not (held.floor is not None and held.floor >= self._zp(held)):
            raise _refuse(step, f"its pads {[t, left, b, r]} are not TFLite's SAME, and a PAD before a max pool is "
                          "exact only after a ReLU")
        src = self.tf.tensors[held.index]
        pads = self._const(f"{step.out}/paddings", np.array([[0, 0], [t, b], [left, r], [0, 0]], np.int32), "int32")
        padded = self.tf.add(TFTensor(f"{step.out}/padded", (1, h + t + b, w + left + r, c), "int8", None,
                                      src.scale.copy(), src.zero_point.copy()))
        self._emit("PAD", [held.index, pads], [padded])
        return Held(padded, held.offset, "nhwc", floor=held.floor), VALID, (oh, ow)

    def _zp(self, held: Held) -> int:
        return int(self.tf.tensors[held.index].zero_point[0])

    def _maxpool(self, step: Step, held: Held) -> None:
        if tuple(step.attrs.get("dilations", (1, 1))) != (1, 1):
            raise _refuse(step, "dilated max pooling is not supported")
        kh, kw = step.attrs["kernel_shape"]
        src, padding, (oh, ow) = self._spatial(step, held, (kh, kw))
        c = self._shape(held.index)[3]
        idx = self.tf.add(TFTensor(step.out, (1, oh, ow, c), "int8", None, self.tf.tensors[held.index].scale.copy(),
                                   self.tf.tensors[held.index].zero_point.copy()))
        sh, sw = step.attrs.get("strides", (1, 1))
        self._emit("MAX_POOL_2D", [src.index], [idx], {"Padding": padding, "StrideW": sw, "StrideH": sh,
                                                        "FilterWidth": kw, "FilterHeight": kh,
                                                        "FusedActivationFunction": 0})
        self.held[step.out] = Held(idx, held.offset, "nhwc", floor=held.floor)

    def _avgpool(self, step: Step, held: Held, same: bool) -> None:
        if not same:
            raise _refuse(step, "TFLite's int8 AVERAGE_POOL_2D keeps its input's scale and zero point; this one "
                          "requantizes")
        kh, kw = step.attrs["kernel_shape"]
        src, padding, (oh, ow) = self._spatial(step, held, (kh, kw))
        if src is not held or (padding == SAME and step.attrs.get("count_include_pad", 0)):
            raise _refuse(step, "its padding is not TFLite's (SAME excludes the padding from the count)")
        fused, floor = self._fused(step, step.out_params, held.offset)
        c = self._shape(held.index)[3]
        idx, off = self._act_tensor(step.out, (1, oh, ow, c), step.out_params, f"'{step.out}'")
        sh, sw = step.attrs.get("strides", (1, 1))
        self._emit("AVERAGE_POOL_2D", [held.index], [idx], {"Padding": padding, "StrideW": sw, "StrideH": sh,
                                                             "FilterWidth": kw, "FilterHeight": kh,
                                                             "FusedActivationFunction": fused})
        self.held[step.out] = Held(idx, off, "nhwc", floor=floor)

    def _conv(self, step: Step) -> None:
        x = self._read(step, step.operands[0])
        w_op = step.operands[1]
        w = _weight_values(step, w_op, 0)
        o, cg, kh, kw = w.shape
        c_in = self._shape(x.index)[3] if x.layout == "nhwc" else None
        group = int(step.attrs.get("group", 1))
        src, padding, (oh, ow) = self._spatial(step, x, (kh, kw))
        depthwise = group > 1 and group == c_in and cg == 1
        if group > 1 and not depthwise:
            if c_in != cg * group or o % group:
                raise _refuse(step, f"input of {c_in} channels does not fit {group} groups of {cg}")
            # TensorFlow Lite Micro has no grouped CONV_2D: the same integers as a dense weight with
            # zeros outside each output channel's group (exact; `groups` times the weight's size)
            dense = np.zeros((o, c_in, kh, kw), w.dtype)
            per = o // group
            for g in range(group):
                dense[g * per:(g + 1) * per, g * cg:(g + 1) * cg] = w[g * per:(g + 1) * per]
            w, cg, group = dense, c_in, 1
            self.expanded.append(step.node)
        s_w = np.broadcast_to(np.asarray(w_op.params.scale, np.float32).reshape(-1), (o,))
        if depthwise:
            weight = self._const(w_op.tensor, w.transpose(1, 2, 3, 0).astype(np.int8), "int8", s_w, axis=3)
        else:
            weight = self._const(w_op.tensor, w.transpose(0, 2, 3, 1).astype(np.int8), "int8", s_w, axis=0)
        bias = self._bias(step, x, s_w, o)
        fused, floor = self._fused(step, step.out_params, _offset(step.out_params, f"'{step.out}'"))
        idx, off = self._act_tensor(step.out, (1, oh, ow, o), step.out_params, f"'{step.out}'")
        sh, sw = step.attrs.get("strides", (1, 1))
        dh, dw = step.attrs.get("dilations", (1, 1))
        opts = {"Padding": padding, "StrideW": sw, "StrideH": sh, "FusedActivationFunction": fused,
                "DilationWFactor": dw, "DilationHFactor": dh}
        if depthwise:
            opts["DepthMultiplier"] = o // group
        self._emit("DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", [src.index, weight, bias], [idx], opts)
        self.held[step.out] = Held(idx, off, "nhwc", floor=floor)

    def _bias(self, step: Step, x: Held, s_w: np.ndarray, n_out: int) -> int:
        s_x = np.float32(self.tf.tensors[x.index].scale[0])
        scale = (s_x * s_w).astype(np.float32)
        name = f"{step.out}/bias"
        values = np.zeros(n_out, np.int32)
        if len(step.operands) > 2:
            b = step.operands[2]
            if b.const is None or b.params.qtype.name != "int32" or np.any(b.params.zero_point != 0):
                raise _refuse(step, f"bias '{b.tensor}' is not an int32 constant with zero point 0")
            got = np.broadcast_to(np.asarray(b.params.scale, np.float32).reshape(-1), (n_out,))
            if not np.allclose(got, scale, rtol=1e-6, atol=0):
                raise _refuse(step, f"bias '{b.tensor}' scale is not input scale × weight scale")
            values = np.broadcast_to(b.const.reshape(-1), (n_out,)).astype(np.int32)
            name = b.tensor
        return self._const(name, values, "int32", scale, axis=0)

    def _fc(self, step: Step) -> None:
        a = step.attrs
        if step.op == "Gemm" and (a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
            raise _refuse(step, "transA, alpha or beta other than 0, 1, 1")
        x = self._read(step, step.operands[0])
        if x.layout == "nhwc":
            raise _refuse(step, "its input is a 4-D tensor (flatten it first)")
        w_op = step.operands[1]
        trans_b = bool(a.get("transB", 0)) if step.op == "Gemm" else False
        w = _weight_values(step, w_op, 0 if trans_b else 1)
        if w.ndim != 2:
            raise _refuse(step, "the weight must be 2-D")
        w = w if trans_b else w.T  # [out, in]
        o, k = w.shape
        if x.layout == "flat_nhwc":
            c, h, ww = x.chw
            w = w.reshape(o, c, h, ww).transpose(0, 2, 3, 1).reshape(o, k)
        s_w = np.broadcast_to(np.asarray(w_op.params.scale, np.float32).reshape(-1), (o,))
        weight = self._const(w_op.tensor, w.astype(np.int8), "int8", s_w, axis=0)
        bias = self._bias(step, x, s_w, o)  # MatMul: zeros
        fused, floor = self._fused(step, step.out_params, _offset(step.out_params, f"'{step.out}'"))
        idx, off = self._act_tensor(step.out, (1, o), step.out_params, f"'{step.out}'")
        self._emit("FULLY_CONNECTED", [x.index, weight, bias], [idx],
                   {"FusedActivationFunction": fused, "KeepNumDims": False})
        self.held[step.out] = Held(idx, off, "flat", floor=floor)

    def _add(self, step: Step) -> None:
        a, b = (self._read(step, op) for op in step.operands)
        sa, sb = self._shape(a.index), self._shape(b.index)
        if sa != sb or a.layout != b.layout:
            raise _refuse(step, f"broadcasting ADD of {list(sa)} and {list(sb)} is not supported")
        fused, floor = self._fused(step, step.out_params, _offset(step.out_params, f"'{step.out}'"))
        idx, off = self._act_tensor(step.out, sa, step.out_params, f"'{step.out}'")
        self._emit("ADD", [a.index, b.index], [idx], {"FusedActivationFunction": fused})
        self.held[step.out] = Held(idx, off, a.layout, a.chw, floor)

    def _mean(self, step: Step) -> None:
        x = self._read(step, step.operands[0])
        if x.layout != "nhwc":
            raise _refuse(step, "its input is not a 4-D image tensor")
        keep = step.op == "GlobalAveragePool" or bool(step.attrs.get("keepdims", 1))
        if step.op == "ReduceMean":
            axes = tuple(sorted(int(v) % 4 for v in np.asarray(step.attrs.get("axes", [])).reshape(-1)))
            if axes != (2, 3):
                raise _refuse(step, f"only a mean over the spatial axes (2, 3) is supported, not {axes}")
        lo, hi = _bounds(step.out_params, step.clamp)
        off = _offset(step.out_params, f"'{step.out}'")
        if (lo - off, hi - off) != (-128, 127):
            raise _refuse(step, "a clamp after the mean has no fused activation in TFLite's MEAN")
        c = self._shape(x.index)[3]
        axes_t = self._const(f"{step.out}/axes", np.array([1, 2], np.int32), "int32")
        name = step.out if keep else f"{step.out}/keepdims"
        idx, off = self._act_tensor(name, (1, 1, 1, c), step.out_params, f"'{step.out}'")
        self._emit("MEAN", [x.index, axes_t], [idx], {"KeepDims": True})
        held = Held(idx, off, "nhwc")
        if not keep:
            held = self._flatten(step.out, held, step.out_params)
        self.held[step.out] = held

    def _flatten(self, name: str, held: Held, params: QParams) -> Held:
        shape = self._shape(held.index)
        size = int(np.prod(shape[1:]))
        shape_t = self._const(f"{name}/shape", np.array([1, size], np.int32), "int32")
        src = self.tf.tensors[held.index]
        idx = self.tf.add(TFTensor(name, (1, size), "int8", None, src.scale.copy(), src.zero_point.copy()))
        self._emit("RESHAPE", [held.index, shape_t], [idx])
        if held.layout == "nhwc" and (shape[1], shape[2]) != (1, 1):
            return Held(idx, held.offset, "flat_nhwc", (shape[3], shape[1], shape[2]), held.floor)
        return Held(idx, held.offset, "flat" if held.layout != "flat_nhwc" else held.layout, held.chw, held.floor)

    def _reshape(self, step: Step, held: Held, params: QParams) -> None:
        if step.op == "Flatten":
            if int(step.attrs.get("axis", 1)) != 1:
                raise _refuse(step, "only Flatten(axis=1) is supported")
        elif step.op == "Reshape":
            target = [int(d) for d in step.attrs["shape"]]
            if len(target) != 2 or target[0] not in (0, 1, -1) or (target[0] == -1 and target[1] == -1):
                raise _refuse(step, f"only a reshape to (batch, features) is supported, not {target}")
        self.held[step.out] = self._flatten(step.out, held, params)

    def _concat(self, step: Step, operands: list[Operand]) -> None:
        ins = [self._read(step, op) for op in operands]
        layouts = {h.layout for h in ins}
        if len(layouts) != 1:
            raise _refuse(step, "its inputs have different layouts")
        layout = layouts.pop()
        axis = int(step.attrs.get("axis", 1))
        rank = len(self._shape(ins[0].index))
        axis %= rank
        if layout == "nhwc":
            axis = {0: 0, 1: 3, 2: 1, 3: 2}[axis]
        elif layout == "flat_nhwc":
            raise _refuse(step, "joining flattened image tensors is not supported")
        off = _offset(step.out_params, f"'{step.out}'")
        z8 = int(step.out_params.zero_point) - off
        scale = np.array([float(step.out_params.scale)], np.float32)
        parts = []
        for op, h in zip(operands, ins):
            t = self.tf.tensors[h.index]
            if float(t.scale[0]) == float(scale[0]) and int(t.zero_point[0]) == z8:
                parts.append(h.index)
                continue
            q = self.tf.add(TFTensor(f"{step.out}/{op.tensor}", t.shape, "int8", None, scale.copy(),
                                     np.array([z8], np.int64)))
            self._emit("QUANTIZE", [h.index], [q])
            parts.append(q)
        shape = list(self._shape(ins[0].index))
        shape[axis] = sum(self._shape(p)[axis] for p in parts)
        idx, off = self._act_tensor(step.out, shape, step.out_params, f"'{step.out}'")
        fused, floor = self._fused(step, step.out_params, off)
        self._emit("CONCATENATION", parts, [idx], {"Axis": axis, "FusedActivationFunction": fused})
        self.held[step.out] = Held(idx, off, layout, None, floor)


def _same(a: QParams, b: QParams) -> bool:
    return a.qtype == b.qtype and np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point)


def _weight_values(step: Step, op: Operand, channel_axis: int) -> np.ndarray:
    if op.const is None:
        raise _refuse(step, f"weight '{op.tensor}' is not a constant")
    if op.params.qtype.name != "int8":
        raise _refuse(step, f"weight '{op.tensor}' is {op.params.qtype.name}: the int8 file takes int8 weights "
                      "(export --target tflite-micro from an 8-bit run)")
    if np.any(op.params.zero_point != 0):
        raise _refuse(step, f"weight '{op.tensor}' has a non-zero zero point (TFLite's weights are symmetric)")
    if op.params.axis is not None and op.params.axis % op.const.ndim != channel_axis:
        raise _refuse(step, f"weight '{op.tensor}' is quantized per channel on axis {op.params.axis}, not on its "
                      f"output-channel axis {channel_axis}")
    return op.const


def qdq_to_tflite(model: onnx.ModelProto, io: str = "int8") -> TFModel:
    """The TFLite model of an int8 QDQ ONNX model (see the module docstring); raises
    :class:`UserInputError` naming the first operator it cannot translate."""
    return Writer(model, io).translate()
