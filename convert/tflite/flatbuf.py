"""A small in-memory description of a one-subgraph TFLite model, written and read with the
schema's own Python bindings (the ``tflite`` package over ``flatbuffers``; no TensorFlow).

:class:`TFModel` holds tensors (shape, type, constant data, quantization) and operators (builtin
name, inputs, outputs, options). :func:`to_bytes` serializes it; :func:`parse` reads bytes back
into the same description, refusing anything malformed with :class:`UserInputError` (one line);
:func:`read_file` is the single place a .tflite file is read from disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UserInputError

# operators the writer emits and the reference executes (TFLite Micro and Vela support them all)
OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MAX_POOL_2D", "AVERAGE_POOL_2D", "MEAN",
       "PAD", "RESHAPE", "CONCATENATION", "QUANTIZE", "DEQUANTIZE")
_VERSIONS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "ADD": 2, "MAX_POOL_2D": 2,
             "AVERAGE_POOL_2D": 2, "MEAN": 2, "PAD": 2, "RESHAPE": 1, "CONCATENATION": 2, "QUANTIZE": 2,
             "DEQUANTIZE": 2}
# builtin options table of each operator and its fields (schema names, CamelCase)
_OPTIONS = {
    "CONV_2D": ("Conv2DOptions", ("Padding", "StrideW", "StrideH", "FusedActivationFunction",
                                  "DilationWFactor", "DilationHFactor")),
    "DEPTHWISE_CONV_2D": ("DepthwiseConv2DOptions", ("Padding", "StrideW", "StrideH", "DepthMultiplier",
                                                     "FusedActivationFunction", "DilationWFactor",
                                                     "DilationHFactor")),
    "FULLY_CONNECTED": ("FullyConnectedOptions", ("FusedActivationFunction", "KeepNumDims")),
    "ADD": ("AddOptions", ("FusedActivationFunction",)),
    "MAX_POOL_2D": ("Pool2DOptions", ("Padding", "StrideW", "StrideH", "FilterWidth", "FilterHeight",
                                      "FusedActivationFunction")),
    "AVERAGE_POOL_2D": ("Pool2DOptions", ("Padding", "StrideW", "StrideH", "FilterWidth", "FilterHeight",
                                          "FusedActivationFunction")),
    "MEAN": ("ReducerOptions", ("KeepDims",)),
    "PAD": ("PadOptions", ()),
    "RESHAPE": ("ReshapeOptions", ()),
    "CONCATENATION": ("ConcatenationOptions", ("Axis", "FusedActivationFunction")),
    "QUANTIZE": ("QuantizeOptions", ()),
    "DEQUANTIZE": ("DequantizeOptions", ()),
}
DTYPES = {"int8": np.int8, "int32": np.int32, "float32": np.float32, "uint8": np.uint8, "int16": np.int16,
          "int64": np.int64}
_TYPE_NAMES = {"int8": "INT8", "int32": "INT32", "float32": "FLOAT32", "uint8": "UINT8", "int16": "INT16",
               "int64": "INT64"}


@dataclass
class TFTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # a key of DTYPES
    data: np.ndarray | None = None  # constant values (an initializer), else None
    scale: np.ndarray | None = None  # float32, one per tensor or per channel
    zero_point: np.ndarray | None = None  # int64, same shape as scale
    axis: int = 0  # quantized dimension when per channel

    @property
    def quantized(self) -> bool:
        return self.scale is not None and np.size(self.scale) > 0


@dataclass
class TFOp:
    op: str  # a name of OPS
    inputs: list[int]
    outputs: list[int]
    options: dict = field(default_factory=dict)  # CamelCase schema field -> value


@dataclass
class TFModel:
    tensors: list[TFTensor] = field(default_factory=list)
    ops: list[TFOp] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    description: str = "wnconvert"

    def add(self, tensor: TFTensor) -> int:
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def index(self, name: str) -> int:
        for i, t in enumerate(self.tensors):
            if t.name == name:
                return i
        raise KeyError(name)


def _tflite():
    try:
        import flatbuffers  # noqa: F401 (the tflite bindings need it)
        import tflite
    except ImportError:
        raise UserInputError("TFLite files need the 'tflite' and 'flatbuffers' packages: "
                             "pip install 'wnconvert[tflite]'") from None
    return tflite


def _vector(builder, start, values, kind: str):
    start(builder, len(values))
    prepend = getattr(builder, f"Prepend{kind}")
    for v in reversed(values):
        prepend(v)
    return builder.EndVector()


def _offsets(builder, start, offsets):
    start(builder, len(offsets))
    for o in reversed(offsets):
        builder.PrependUOffsetTRelative(o)
    return builder.EndVector()


def to_bytes(model: TFModel) -> bytes:
    """The model as a TFLite flatbuffer (schema version 3, one subgraph, buffer 0 empty)."""
    tfl = _tflite()
    import flatbuffers

    b = flatbuffers.Builder(1024)
    # buffers: 0 empty, then one per constant tensor (data aligned to 16 bytes)
    buffer_of, blobs = {}, []
    for i, t in enumerate(model.tensors):
        if t.data is not None:
            buffer_of[i] = len(blobs) + 1
            blobs.append(np.ascontiguousarray(np.asarray(t.data, dtype=DTYPES[t.dtype])).tobytes())
    buffer_offsets = []
    for blob in [None] + blobs:
        data = None
        if blob is not None:
            b.StartVector(1, len(blob), 16)  # 16-byte aligned, as TFLite's converter writes them
            b.head = b.head - len(blob)
            b.Bytes[b.head:b.head + len(blob)] = blob
            data = b.EndVector()
        tfl.BufferStart(b)
        if data is not None:
            tfl.BufferAddData(b, data)
        buffer_offsets.append(tfl.BufferEnd(b))
    tensor_offsets = [_tensor(b, tfl, t, buffer_of.get(i, 0)) for i, t in enumerate(model.tensors)]
    codes = sorted({op.op for op in model.ops}, key=OPS.index)
    code_offsets = []
    for name in codes:
        code = getattr(tfl.BuiltinOperator, name)
        tfl.OperatorCodeStart(b)
        tfl.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
        tfl.OperatorCodeAddBuiltinCode(b, code)
        tfl.OperatorCodeAddVersion(b, _VERSIONS[name])
        code_offsets.append(tfl.OperatorCodeEnd(b))
    op_offsets = [_operator(b, tfl, op, codes.index(op.op)) for op in model.ops]
    tensors = _offsets(b, tfl.SubGraphStartTensorsVector, tensor_offsets)
    inputs = _vector(b, tfl.SubGraphStartInputsVector, model.inputs, "Int32")
    outputs = _vector(b, tfl.SubGraphStartOutputsVector, model.outputs, "Int32")
    operators = _offsets(b, tfl.SubGraphStartOperatorsVector, op_offsets)
    name = b.CreateString("main")
    tfl.SubGraphStart(b)
    tfl.SubGraphAddTensors(b, tensors)
    tfl.SubGraphAddInputs(b, inputs)
    tfl.SubGraphAddOutputs(b, outputs)
    tfl.SubGraphAddOperators(b, operators)
    tfl.SubGraphAddName(b, name)
    subgraph = tfl.SubGraphEnd(b)
    subgraphs = _offsets(b, tfl.ModelStartSubgraphsVector, [subgraph])
    opcodes = _offsets(b, tfl.ModelStartOperatorCodesVector, code_offsets)
    buffers = _offsets(b, tfl.ModelStartBuffersVector, buffer_offsets)
    description = b.CreateString(model.description)
    tfl.ModelStart(b)
    tfl.ModelAddVersion(b, 3)
    tfl.ModelAddOperatorCodes(b, opcodes)
    tfl.ModelAddSubgraphs(b, subgraphs)
    tfl.ModelAddDescription(b, description)
    tfl.ModelAddBuffers(b, buffers)
    b.Finish(tfl.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _tensor(b, tfl, t: TFTensor, buffer: int):
    name = b.CreateString(t.name)
    shape = _vector(b, tfl.TensorStartShapeVector, [int(d) for d in t.shape], "Int32")
    quant = None
    if t.quantized:
        scale = _vector(b, tfl.QuantizationParametersStartScaleVector,
                        [float(s) for s in np.asarray(t.scale, np.float32).reshape(-1)], "Float32")
        zps = _vector(b, tfl.QuantizationParametersStartZeroPointVector,
                      [int(z) for z in np.asarray(t.zero_point).reshape(-1)], "Int64")
        tfl.QuantizationParametersStart(b)
        tfl.QuantizationParametersAddScale(b, scale)
        tfl.QuantizationParametersAddZeroPoint(b, zps)
        tfl.QuantizationParametersAddQuantizedDimension(b, int(t.axis))
        quant = tfl.QuantizationParametersEnd(b)
    tfl.TensorStart(b)
    tfl.TensorAddShape(b, shape)
    tfl.TensorAddType(b, getattr(tfl.TensorType, _TYPE_NAMES[t.dtype]))
    tfl.TensorAddBuffer(b, buffer)
    tfl.TensorAddName(b, name)
    if quant is not None:
        tfl.TensorAddQuantization(b, quant)
    return tfl.TensorEnd(b)


def _operator(b, tfl, op: TFOp, code_index: int):
    table, fields = _OPTIONS[op.op]
    unknown = set(op.options) - set(fields)
    if unknown:
        raise ValueError(f"{op.op}: unknown options {sorted(unknown)}")
    getattr(tfl, f"{table}Start")(b)
    for name in fields:
        if name in op.options:
            getattr(tfl, f"{table}Add{name}")(b, op.options[name])
    options = getattr(tfl, f"{table}End")(b)
    inputs = _vector(b, tfl.OperatorStartInputsVector, op.inputs, "Int32")
    outputs = _vector(b, tfl.OperatorStartOutputsVector, op.outputs, "Int32")
    tfl.OperatorStart(b)
    tfl.OperatorAddOpcodeIndex(b, code_index)
    tfl.OperatorAddInputs(b, inputs)
    tfl.OperatorAddOutputs(b, outputs)
    tfl.OperatorAddBuiltinOptionsType(b, getattr(tfl.BuiltinOptions, table))
    tfl.OperatorAddBuiltinOptions(b, options)
    return tfl.OperatorEnd(b)


# -- reading ---------------------------------------------------------------------------------------



def read_file(path) -> bytes:
    """The bytes of a .tflite file, through the project's guarded reader (regular files only,
    bounded; a missing, unreadable or oversized file is one line, exit 2)."""
    from ..reading import read_bytes

    return read_bytes(path, "tflite")
def parse(data: bytes, label: str = "the .tflite file") -> TFModel:
    """Read a TFLite flatbuffer into a :class:`TFModel`; anything malformed (truncated, crafted,
    an operator or type this tool does not know, offsets out of bounds) is one
    :class:`UserInputError` line."""
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise UserInputError(f"{label} is not a TFLite flatbuffer (no TFL3 identifier)")
    try:
        return _parse(data, label)
    except UserInputError:
        raise
    except Exception as e:  # noqa: BLE001 (flatbuffers raises IndexError, struct.error, ... on a damaged file)
        raise UserInputError(f"{label} is damaged or truncated ({type(e).__name__})") from None


def _names(enum_class) -> dict[int, str]:
    return {v: k for k, v in vars(enum_class).items() if not k.startswith("_") and isinstance(v, int)}


def _parse(data: bytes, label: str) -> TFModel:
    tfl = _tflite()
    m = tfl.Model.GetRootAsModel(data, 0)
    if m.SubgraphsLength() != 1:
        raise UserInputError(f"{label} has {m.SubgraphsLength()} subgraphs; one is supported")
    op_names, type_names = _names(tfl.BuiltinOperator), _names(tfl.TensorType)
    dtype_of = {v: k for k, v in _TYPE_NAMES.items()}
    g = m.Subgraphs(0)
    model = TFModel(description=(m.Description() or b"").decode("utf-8", "replace"))
    n_buffers = m.BuffersLength()
    for i in range(g.TensorsLength()):
        t = g.Tensors(i)
        tname = type_names.get(t.Type(), str(t.Type()))
        if tname not in dtype_of:
            raise UserInputError(f"{label}: tensor {i} has type {tname}, which the reference does not support")
        dtype = dtype_of[tname]
        shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        if any(d < 0 for d in shape):
            raise UserInputError(f"{label}: tensor {i} has a dynamic shape {list(shape)}")
        values = None
        if not 0 <= t.Buffer() < n_buffers:
            raise UserInputError(f"{label}: tensor {i} points to buffer {t.Buffer()} of {n_buffers}")
        buf = m.Buffers(t.Buffer())
        if buf is not None and (buf.DataLength() or buf.Offset()):
            if buf.Offset():
                raise UserInputError(f"{label}: tensor {i} keeps its data outside the flatbuffer")
            raw = buf.DataAsNumpy().tobytes()
            expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            if len(raw) != expected:
                raise UserInputError(f"{label}: tensor {i} holds {len(raw)} bytes, its shape needs {expected}")
            values = np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape).copy()
        scale = zp = None
        axis = 0
        q = t.Quantization()
        if q is not None and q.ScaleLength():
            scale = q.ScaleAsNumpy().astype(np.float32)
            zp = (q.ZeroPointAsNumpy().astype(np.int64) if q.ZeroPointLength()
                  else np.zeros(scale.shape, np.int64))
            if zp.shape != scale.shape or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
                raise UserInputError(f"{label}: tensor {i} has invalid quantization parameters")
            axis = int(q.QuantizedDimension())
        name = (t.Name() or b"").decode("utf-8", "replace") or f"tensor_{i}"
        model.tensors.append(TFTensor(name, shape, dtype, values, scale, zp, axis))
    n = len(model.tensors)
    for i in range(g.OperatorsLength()):
        o = g.Operators(i)
        if not 0 <= o.OpcodeIndex() < m.OperatorCodesLength():
            raise UserInputError(f"{label}: operator {i} has no operator code")
        code = m.OperatorCodes(o.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = op_names.get(builtin, f"code {builtin}")
        if name not in OPS:
            raise UserInputError(f"{label}: operator {i} is {name}, which the reference does not support")
        ins = [int(v) for v in o.InputsAsNumpy()] if o.InputsLength() else []
        outs = [int(v) for v in o.OutputsAsNumpy()] if o.OutputsLength() else []
        if any(not -1 <= v < n for v in ins) or any(not 0 <= v < n for v in outs):
            raise UserInputError(f"{label}: operator {i} ({name}) refers to a tensor that does not exist")
        model.ops.append(TFOp(name, ins, outs, _read_options(tfl, o, name)))
    model.inputs = [int(v) for v in g.InputsAsNumpy()] if g.InputsLength() else []
    model.outputs = [int(v) for v in g.OutputsAsNumpy()] if g.OutputsLength() else []
    if any(not 0 <= v < n for v in model.inputs + model.outputs):
        raise UserInputError(f"{label}: a graph input or output refers to a tensor that does not exist")
    return model


def _read_options(tfl, o, op_name: str) -> dict:
    table, fields = _OPTIONS[op_name]
    if not fields:
        return {}
    raw = o.BuiltinOptions()
    if raw is None:
        raise UserInputError(f"{op_name} operator without its options")
    cls = getattr(getattr(tfl, table), table) if not isinstance(getattr(tfl, table), type) else getattr(tfl, table)
    opts = cls()
    opts.Init(raw.Bytes, raw.Pos)
    return {name: getattr(opts, name)() for name in fields}
