"""The operator builders of the QDQ ONNX -> TFLite writer (:mod:`.writer`): one method per TFLite
operator (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, MAX_POOL_2D, AVERAGE_POOL_2D, MEAN, PAD,
RESHAPE, CONCATENATION), each translating one step of the integer graph with its integers and
scales, or refusing it naming the operator."""

from __future__ import annotations

import numpy as np

from ..intref.execute import _bounds
from ..intref.graph import Operand, QParams, Step
from .flatbuf import TFTensor
from .reference import SAME, VALID, same_padding
from .tensors import Held, TensorTable, act_offset, refuse, weight_values


class OpBuilders(TensorTable):
    """The translation of each kind of integer-graph step; :class:`.writer.Writer` dispatches to them."""

    # -- spatial ops ----------------------------------------------------------------------------
    def _spatial(self, step: Step, held: Held, kernel) -> tuple[Held, int, tuple]:
        """Padding of a conv/pool input: (input, SAME|VALID, (oh, ow)); a PAD operator when
        ONNX's pads are neither."""
        a = step.attrs
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise refuse(step, "auto_pad is not supported")
        if a.get("ceil_mode", 0):
            raise refuse(step, "ceil_mode is not supported")
        if held.layout != "nhwc":
            raise refuse(step, "its input is not a 4-D image tensor")
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
            raise refuse(step, f"its pads {[t, left, b, r]} are not TFLite's SAME, and a PAD before a max pool is "
                         "exact only after a ReLU")
        src = self.tf.tensors[held.index]
        pads = self._const(f"{step.out}/paddings", np.array([[0, 0], [t, b], [left, r], [0, 0]], np.int32), "int32")
        padded = self.tf.add(TFTensor(f"{step.out}/padded", (1, h + t + b, w + left + r, c), "int8", None,
                                      src.scale.copy(), src.zero_point.copy()))
        self._emit("PAD", [held.index, pads], [padded])
        return Held(padded, held.offset, "nhwc", floor=held.floor), VALID, (oh, ow)

    def _maxpool(self, step: Step, held: Held) -> None:
        if tuple(step.attrs.get("dilations", (1, 1))) != (1, 1):
            raise refuse(step, "dilated max pooling is not supported")
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
            raise refuse(step, "TFLite's int8 AVERAGE_POOL_2D keeps its input's scale and zero point; this one "
                         "requantizes")
        kh, kw = step.attrs["kernel_shape"]
        src, padding, (oh, ow) = self._spatial(step, held, (kh, kw))
        if src is not held or (padding == SAME and step.attrs.get("count_include_pad", 0)):
            raise refuse(step, "its padding is not TFLite's (SAME excludes the padding from the count)")
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
        w = weight_values(step, w_op, 0)
        o, cg, kh, kw = w.shape
        c_in = self._shape(x.index)[3] if x.layout == "nhwc" else None
        group = int(step.attrs.get("group", 1))
        src, padding, (oh, ow) = self._spatial(step, x, (kh, kw))
        depthwise = group > 1 and group == c_in and cg == 1
        if group > 1 and not depthwise:
            if c_in != cg * group or o % group:
                raise refuse(step, f"input of {c_in} channels does not fit {group} groups of {cg}")
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
        fused, floor = self._fused(step, step.out_params, act_offset(step.out_params, f"'{step.out}'"))
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
                raise refuse(step, f"bias '{b.tensor}' is not an int32 constant with zero point 0")
            got = np.broadcast_to(np.asarray(b.params.scale, np.float32).reshape(-1), (n_out,))
            if not np.allclose(got, scale, rtol=1e-6, atol=0):
                raise refuse(step, f"bias '{b.tensor}' scale is not input scale × weight scale")
            values = np.broadcast_to(b.const.reshape(-1), (n_out,)).astype(np.int32)
            name = b.tensor
        return self._const(name, values, "int32", scale, axis=0)

    def _fc(self, step: Step) -> None:
        a = step.attrs
        if step.op == "Gemm" and (a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
            raise refuse(step, "transA, alpha or beta other than 0, 1, 1")
        x = self._read(step, step.operands[0])
        if x.layout == "nhwc":
            raise refuse(step, "its input is a 4-D tensor (flatten it first)")
        w_op = step.operands[1]
        trans_b = bool(a.get("transB", 0)) if step.op == "Gemm" else False
        w = weight_values(step, w_op, 0 if trans_b else 1)
        if w.ndim != 2:
            raise refuse(step, "the weight must be 2-D")
        w = w if trans_b else w.T  # [out, in]
        o, k = w.shape
        if x.layout == "flat_nhwc":
            c, h, ww = x.chw
            w = w.reshape(o, c, h, ww).transpose(0, 2, 3, 1).reshape(o, k)
        s_w = np.broadcast_to(np.asarray(w_op.params.scale, np.float32).reshape(-1), (o,))
        weight = self._const(w_op.tensor, w.astype(np.int8), "int8", s_w, axis=0)
        bias = self._bias(step, x, s_w, o)  # MatMul: zeros
        fused, floor = self._fused(step, step.out_params, act_offset(step.out_params, f"'{step.out}'"))
        idx, off = self._act_tensor(step.out, (1, o), step.out_params, f"'{step.out}'")
        self._emit("FULLY_CONNECTED", [x.index, weight, bias], [idx],
                   {"FusedActivationFunction": fused, "KeepNumDims": False})
        self.held[step.out] = Held(idx, off, "flat", floor=floor)

    def _add(self, step: Step) -> None:
        a, b = (self._read(step, op) for op in step.operands)
        sa, sb = self._shape(a.index), self._shape(b.index)
        if sa != sb or a.layout != b.layout:
            raise refuse(step, f"broadcasting ADD of {list(sa)} and {list(sb)} is not supported")
        fused, floor = self._fused(step, step.out_params, act_offset(step.out_params, f"'{step.out}'"))
        idx, off = self._act_tensor(step.out, sa, step.out_params, f"'{step.out}'")
        self._emit("ADD", [a.index, b.index], [idx], {"FusedActivationFunction": fused})
        self.held[step.out] = Held(idx, off, a.layout, a.chw, floor)

    def _mean(self, step: Step) -> None:
        x = self._read(step, step.operands[0])
        if x.layout != "nhwc":
            raise refuse(step, "its input is not a 4-D image tensor")
        keep = step.op == "GlobalAveragePool" or bool(step.attrs.get("keepdims", 1))
        if step.op == "ReduceMean":
            axes = tuple(sorted(int(v) % 4 for v in np.asarray(step.attrs.get("axes", [])).reshape(-1)))
            if axes != (2, 3):
                raise refuse(step, f"only a mean over the spatial axes (2, 3) is supported, not {axes}")
        lo, hi = _bounds(step.out_params, step.clamp)
        off = act_offset(step.out_params, f"'{step.out}'")
        if (lo - off, hi - off) != (-128, 127):
            raise refuse(step, "a clamp after the mean has no fused activation in TFLite's MEAN")
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
                raise refuse(step, "only Flatten(axis=1) is supported")
        elif step.op == "Reshape":
            target = [int(d) for d in step.attrs["shape"]]
            if len(target) != 2 or target[0] not in (0, 1, -1) or (target[0] == -1 and target[1] == -1):
                raise refuse(step, f"only a reshape to (batch, features) is supported, not {target}")
        self.held[step.out] = self._flatten(step.out, held, params)

    def _concat(self, step: Step, operands: list[Operand]) -> None:
        ins = [self._read(step, op) for op in operands]
        layouts = {h.layout for h in ins}
        if len(layouts) != 1:
            raise refuse(step, "its inputs have different layouts")
        layout = layouts.pop()
        axis = int(step.attrs.get("axis", 1))
        rank = len(self._shape(ins[0].index))
        axis %= rank
        if layout == "nhwc":
            axis = {0: 0, 1: 3, 2: 1, 3: 2}[axis]
        elif layout == "flat_nhwc":
            raise refuse(step, "joining flattened image tensors is not supported")
        off = act_offset(step.out_params, f"'{step.out}'")
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
