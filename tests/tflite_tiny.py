"""Tiny hand-built int8 .tflite files for tests (one op, or a short chain), written with the flatc
object API TensorFlow Lite Micro ships; and a one-call TFLite Micro runner.

Only what the tests of the TFLite rounding, ``eval`` of a .tflite and the Ethos-U export need:
CONV_2D (per-channel int8 weights, int32 bias, fused ReLU), ADD, MEAN over H and W,
AVERAGE_POOL_2D, FULLY_CONNECTED and RESHAPE, int8 tensors NHWC."""

from __future__ import annotations

import numpy as np
from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as S

_NP_TYPE = {np.dtype(np.int8): S.TensorType.INT8, np.dtype(np.int32): S.TensorType.INT32,
            np.dtype(np.float32): S.TensorType.FLOAT32}


class Builder:
    def __init__(self) -> None:
        self.buffers = [S.BufferT()]          # buffer 0: empty, by convention
        self.tensors: list = []
        self.ops: list = []
        self.codes: list[int] = []

    def tensor(self, shape, dtype=np.int8, scale=None, zero_point=0, data=None, name=None, axis=0) -> int:
        t = S.TensorT()
        t.shape = list(shape)
        t.type = _NP_TYPE[np.dtype(dtype)]
        t.name = name or f"t{len(self.tensors)}"
        if data is not None:
            b = S.BufferT()
            b.data = np.ascontiguousarray(data, dtype=dtype).tobytes()
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        else:
            t.buffer = 0
        if scale is not None:
            q = S.QuantizationParametersT()
            sc = np.atleast_1d(np.asarray(scale, np.float32))
            q.scale = [float(v) for v in sc]
            zp = np.broadcast_to(np.asarray(zero_point, np.int64), sc.shape)
            q.zeroPoint = [int(v) for v in zp]
            q.quantizedDimension = axis
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(self, code: int, inputs, outputs, options_type=0, options=None) -> None:
        if code not in self.codes:
            self.codes.append(code)
        o = S.OperatorT()
        o.opcodeIndex = self.codes.index(code)
        o.inputs, o.outputs = list(inputs), list(outputs)
        o.builtinOptionsType, o.builtinOptions = options_type, options
        self.ops.append(o)

    def finish(self, inputs, outputs) -> bytes:
        import flatbuffers

        sg = S.SubGraphT()
        sg.tensors, sg.operators = self.tensors, self.ops
        sg.inputs, sg.outputs = list(inputs), list(outputs)
        m = S.ModelT()
        m.version = 3
        m.description = "wnconvert test"
        codes = []
        for c in self.codes:
            oc = S.OperatorCodeT()
            oc.builtinCode = c
            oc.deprecatedBuiltinCode = min(c, 127)
            oc.version = 1
            codes.append(oc)
        m.operatorCodes, m.subgraphs, m.buffers = codes, [sg], self.buffers
        b = flatbuffers.Builder(1024)
        b.Finish(m.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    # -- operators --------------------------------------------------------------------------
    def conv(self, x: int, w: np.ndarray, w_scale, bias: np.ndarray, out_scale: float, out_zp: int = 0,
             relu: bool = False, stride: int = 1, padding: str = "SAME") -> int:
        """CONV_2D; ``w`` int8 OHWI, per-channel ``w_scale``; int32 ``bias`` at ``s_in·s_w``."""
        s_in = self.tensors[x].quantization.scale[0]
        n, h, wd, _ = self.tensors[x].shape
        o = w.shape[0]
        wt = self.tensor(w.shape, np.int8, w_scale, 0, w)
        bt = self.tensor((o,), np.int32, np.float32(s_in) * np.asarray(w_scale, np.float32), 0, bias)
        oh = -(-h // stride) if padding == "SAME" else (h - w.shape[1]) // stride + 1
        ow = -(-wd // stride) if padding == "SAME" else (wd - w.shape[2]) // stride + 1
        y = self.tensor((n, oh, ow, o), np.int8, out_scale, out_zp)
        opt = S.Conv2DOptionsT()
        opt.padding = S.Padding.SAME if padding == "SAME" else S.Padding.VALID
        opt.strideH = opt.strideW = stride
        opt.dilationHFactor = opt.dilationWFactor = 1
        opt.fusedActivationFunction = S.ActivationFunctionType.RELU if relu else S.ActivationFunctionType.NONE
        self.op(S.BuiltinOperator.CONV_2D, [x, wt, bt], [y], S.BuiltinOptions.Conv2DOptions, opt)
        return y

    def add(self, a: int, b: int, out_scale: float, out_zp: int = 0, relu: bool = False) -> int:
        y = self.tensor(self.tensors[a].shape, np.int8, out_scale, out_zp)
        opt = S.AddOptionsT()
        opt.fusedActivationFunction = S.ActivationFunctionType.RELU if relu else S.ActivationFunctionType.NONE
        self.op(S.BuiltinOperator.ADD, [a, b], [y], S.BuiltinOptions.AddOptions, opt)
        return y

    def mean(self, x: int, out_scale: float, out_zp: int = 0) -> int:
        """MEAN over H and W, keep_dims false: (N, C)."""
        n, _, _, c = self.tensors[x].shape
        axes = self.tensor((2,), np.int32, data=np.array([1, 2], np.int32))
        y = self.tensor((n, c), np.int8, out_scale, out_zp)
        opt = S.ReducerOptionsT()
        opt.keepDims = False
        self.op(S.BuiltinOperator.MEAN, [x, axes], [y], S.BuiltinOptions.ReducerOptions, opt)
        return y

    def avgpool(self, x: int, size: int, out_scale: float | None = None, out_zp: int | None = None) -> int:
        n, h, w, c = self.tensors[x].shape
        q = self.tensors[x].quantization
        y = self.tensor((n, h // size, w // size, c), np.int8, out_scale or q.scale[0],
                        q.zeroPoint[0] if out_zp is None else out_zp)
        opt = S.Pool2DOptionsT()
        opt.padding = S.Padding.VALID
        opt.strideH = opt.strideW = opt.filterHeight = opt.filterWidth = size
        opt.fusedActivationFunction = S.ActivationFunctionType.NONE
        self.op(S.BuiltinOperator.AVERAGE_POOL_2D, [x], [y], S.BuiltinOptions.Pool2DOptions, opt)
        return y

    def fully_connected(self, x: int, w: np.ndarray, w_scale, bias: np.ndarray, out_scale: float,
                        out_zp: int = 0) -> int:
        s_in = self.tensors[x].quantization.scale[0]
        o = w.shape[0]
        wt = self.tensor(w.shape, np.int8, w_scale, 0, w)
        bt = self.tensor((o,), np.int32, np.float32(s_in) * np.asarray(w_scale, np.float32), 0, bias)
        y = self.tensor((self.tensors[x].shape[0], o), np.int8, out_scale, out_zp)
        opt = S.FullyConnectedOptionsT()
        opt.fusedActivationFunction = S.ActivationFunctionType.NONE
        self.op(S.BuiltinOperator.FULLY_CONNECTED, [x, wt, bt], [y], S.BuiltinOptions.FullyConnectedOptions, opt)
        return y


def run_micro(data: bytes, *inputs: np.ndarray) -> np.ndarray:
    """TensorFlow Lite Micro's output 0 for ``inputs``."""
    from tflite_micro import runtime

    it = runtime.Interpreter.from_bytes(data)
    for i, x in enumerate(inputs):
        it.set_input(x, i)
    it.invoke()
    return it.get_output(0)


def small_classifier(size: int = 8, channels: int = 3, classes: int = 4, seed: int = 0,
                     in_scale: float = 2.0 ** -5, in_zp: int = 0) -> bytes:
    """conv(+ReLU) -> MEAN -> FULLY_CONNECTED: an int8 classifier ``(1, size, size, channels)`` ->
    ``(1, classes)`` logits, every operator one TFLite Micro and Vela run."""
    rng = np.random.default_rng(seed)
    b = Builder()
    x = b.tensor((1, size, size, channels), np.int8, in_scale, in_zp, name="input")
    w = rng.integers(-127, 128, (8, 3, 3, channels)).astype(np.int8)
    h = b.conv(x, w, [2.0 ** -7] * 8, rng.integers(-500, 500, 8).astype(np.int32), 2.0 ** -3, -128, relu=True)
    m = b.mean(h, 2.0 ** -3, -128)
    fw = rng.integers(-127, 128, (classes, 8)).astype(np.int8)
    y = b.fully_connected(m, fw, [2.0 ** -7] * classes, rng.integers(-100, 100, classes).astype(np.int32), 2.0 ** -2)
    return b.finish([x], [y])
