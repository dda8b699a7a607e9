"""Low-precision ONNX from an fp32 ONNX file: fp16, int8 (QDQ) and int4 (QDQ, opset 21).

Knows nothing of schemes: it takes the fp32 path, calibration arrays (already preprocessed, NCHW
float32), the precision and options.

* ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` with float32 inputs and
  outputs kept (``keep_io_types``).
* ``int8`` with 8-bit activations (W8A8, the default): ``quant_pre_process`` then
  ``quantize_static`` in QDQ format, int8 weights (per channel by option) and 8-bit activations,
  calibrated on the given arrays with MinMax, Percentile or Entropy. Activations are asymmetric
  uint8 by default (``act_type``): with int8 activations this onnxruntime's CPU provider leaves the
  residual Adds (and the Convs feeding them) as float ops and a ResNet-18 file ran 0.4x as fast as
  fp32, with uint8 about 1.5x faster (docs/results.md). BatchNorm and the scheme's per-channel
  scales are folded into the Conv first (``fuse``); a trained grid keeps its exact integers, with
  the folded factor moved into a per-channel scale.
* weights only (``int4``'s default, ``int8`` with ``act_bits=None``): every Conv/ConvTranspose/
  Gemm/MatMul weight initializer becomes ``DequantizeLinear(int initializer, scale, zero point 0)``;
  activations stay float. Written with onnx helpers, not ``quantize_static``, because (1)
  ``quantize_static`` always quantizes activations too, and (2) its symmetric weight scale is
  ``2·max|w| / (qmax − qmin)`` (``2/15`` for int4 on a [-1, 1] tensor, ``2/255`` for int8), not the
  grid step ``1/L`` a ``--weight-bits`` run trained on. When ``grid_bits`` is given and a weight
  lies on the grid ``k / L`` (``L = 2**(grid_bits-1) − 1``), its scale is exactly ``1/L`` (per
  tensor, or a per-channel vector of ``1/L``) and its integers are ``round(w·L)``: lossless.
  Other weights get the symmetric max scale ``max|w_c| / qmax``, which is lossy.
  onnxruntime (ENABLE_EXTENDED and up) rewrites ``DequantizeLinear -> MatMul`` into
  ``MatMulNBits``, whose default accuracy level quantizes the activations to int8; the comparisons
  here run with ``session.qdq_matmulnbits_accuracy_level=0`` (see ``verify.ort_session``).
* ``int4`` with int8 activations (W4A8): ``quantize_static`` with ``QInt4`` weights, then the
  weights of a grid run are rewritten to the exact grid scale as above.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import UserInputError
from .verify import ort_session

PRECISIONS = ("fp32", "fp16", "int8", "int4")
CALIBRATORS = ("minmax", "percentile", "entropy")
ACT_BITS = (None, 8)
ACT_TYPES = ("uint8", "int8")
INT_OPSET = 21  # DequantizeLinear with int4 inputs
WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1)}


def artifact_name(precision: str) -> str:
    check_precision(precision)
    return "model.onnx" if precision == "fp32" else f"model.{precision}.onnx"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserInputError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    return precision


@dataclass(frozen=True)
class QuantOptions:
    precision: str = "int8"
    act_bits: int | None = 8            # None: float activations (weights only)
    per_channel: bool = True            # weight scales per output channel
    calibrate_method: str = "minmax"
    grid_bits: int | None = None        # weights trained on the symmetric grid of this many bits
    act_type: str = "uint8"             # quantized activations: uint8 (asymmetric) | int8
    fuse: bool | None = None            # fold BatchNorm / scale Muls into Conv first (None: auto)

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.act_type not in ACT_TYPES:
            raise UserInputError(f"activation type must be one of: {', '.join(ACT_TYPES)}, not {self.act_type!r}")
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
        return self.precision in ("int8", "int4") and self.act_bits is not None


@dataclass
class QuantResult:
    path: Path
    precision: str
    options: QuantOptions
    exact_weights: list[str] = field(default_factory=list)   # written on the trained grid, lossless
    lossy_weights: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        o = self.options
        return {"file": self.path.name, "precision": self.precision,
                "activations": "float" if o.act_bits is None or self.precision == "fp16" else o.act_type,
                "fused": o.fuses,
                "per_channel": o.per_channel, "calibrate_method": o.calibrate_method if o.needs_calibration else None,
                "grid_bits": o.grid_bits, "exact_weights": len(self.exact_weights),
                "lossy_weights": len(self.lossy_weights), "notes": self.notes}


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


def quantize(src: Path, dst: Path, options: QuantOptions, calib: np.ndarray | None = None) -> QuantResult:
    """Write the ``options.precision`` version of the fp32 ONNX ``src`` to ``dst`` (atomically)."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise UserInputError(f"{src} does not exist")
    if options.precision == "fp32":
        raise UserInputError("fp32 is the exported model.onnx itself; nothing to quantize")
    if options.needs_calibration and (calib is None or len(calib) == 0):
        raise UserInputError(f"--precision {options.precision} with int8 activations needs calibration "
                             "data: pass --data SPEC (or weights only: --act-bits float)")
    result = QuantResult(dst, options.precision, options)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=dst.parent) as tmp:
        tmp = Path(tmp)
        out = tmp / dst.name
        if options.precision == "fp16":
            _to_fp16(src, out)
        elif options.act_bits is None:
            model = onnx.load(str(src))
            model = _weights_only(model, options, result)
            onnx.save(model, str(out))
        else:
            _static(src, out, tmp, options, calib, result)
        onnx.checker.check_model(str(out))
        shutil.move(str(out), str(dst))
    return result


# -- fp16 -------------------------------------------------------------------------------------------

def _to_fp16(src: Path, out: Path) -> None:
    model = onnx.load(str(src))
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:  # pragma: no cover - onnxruntime ships it
        model = _cast_initializers_fp16(model)
    else:
        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
        _topological_sort(model.graph)  # the converter appends its input casts at the end
    onnx.save(model, str(out))


def _topological_sort(graph) -> None:
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                ordered.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a cycle or a missing input: leave the order to the checker
            ordered.extend(rest)
            break
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _cast_initializers_fp16(model: onnx.ModelProto) -> onnx.ModelProto:  # pragma: no cover
    raise UserInputError("fp16 export needs onnxruntime.transformers.float16, which is not importable")


# -- int8 / int4 with quantized activations (onnxruntime.quantization) -----------------------------

def _static(src: Path, out: Path, tmp: Path, options: QuantOptions, calib: np.ndarray,
            result: QuantResult) -> None:
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "pre.onnx"
    try:
        # Shapes inferred; with options.fuses also onnxruntime's basic fusions (BatchNormalization
        # and constant Mul/Add into Conv), without which every BatchNorm stays a float op between
        # a DequantizeLinear and a QuantizeLinear and the int8 file runs slower than fp32.
        quant_pre_process(str(src), str(pre), skip_optimization=not options.fuses)
    except Exception as e:  # symbolic shape inference can fail on exotic graphs; quantize as is
        result.notes.append(f"quant_pre_process skipped: {type(e).__name__}")
        shutil.copy(src, pre)
    if options.precision == "int4":  # int4 DequantizeLinear is opset 21 (else com.microsoft)
        onnx.save(_set_opset(onnx.load(str(pre)), INT_OPSET), str(pre))
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[options.calibrate_method]
    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
    wtype = QuantType.QInt4 if options.precision == "int4" else QuantType.QInt8
    import logging
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns per tensor on the root logger
    try:
        _quantize_static(quantize_static, pre, out, name, calib, QuantFormat, QuantType, wtype,
                         options, method)
    finally:
        logging.getLogger().setLevel(level)
    if options.grid_bits is not None:  # the quantized graph's own weights (BatchNorm folded or not)
        model = onnx.load(str(out))
        _exact_grid_rewrite(model, onnx.load(str(pre)), options, result)
        onnx.save(model, str(out))
    else:
        result.lossy_weights.extend(_dq_weight_names(onnx.load(str(out))))


def _quantize_static(quantize_static, pre, out, name, calib, QuantFormat, QuantType, wtype, options, method):
    quantize_static(
        str(pre), str(out), ArrayReader(name, calib),
        quant_format=QuantFormat.QDQ, weight_type=wtype,
        activation_type=QuantType.QUInt8 if options.act_type == "uint8" else QuantType.QInt8,
        per_channel=options.per_channel, calibrate_method=method,
        op_types_to_quantize=["Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Relu",
                              "MaxPool", "GlobalAveragePool", "AveragePool", "Flatten", "Concat",
                              "Reshape", "Transpose", "Sigmoid", "HardSigmoid", "HardSwish",
                              "Clip"],
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})


def _dq_weight_names(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [n.input[0] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits]


def _grid_integers(w: np.ndarray, L: int, qmax: int) -> tuple[np.ndarray, float] | None:
    """``(k, s)`` with integers ``|k| <= qmax`` and ``k·s == w`` up to float rounding, when ``w``
    lies on a symmetric grid of at most ``L`` levels: its step ``s`` is ``max|w| / j`` for the
    largest integer ``j <= L`` on it. ``w`` may be a trained grid ``k/L`` times a factor (BatchNorm
    folded in), so the step is searched; the trained step ``1/L`` is tried first."""
    m = float(np.abs(w).max()) if w.size else 0.0
    if m == 0.0:
        return np.zeros(w.shape, np.int64), 1.0 / L
    steps = ([1.0 / L] if L <= qmax else []) + [m / j for j in range(min(L, qmax), 0, -1)]
    for s in steps:  # the trained step first, then the folded ones, finest first
        k = np.round(w / s)
        if np.abs(k).max() <= qmax and np.abs(w / s - k).max() <= 1e-4:
            return k.astype(np.int64), s
    return None


def _exact_grid_rewrite(model: onnx.ModelProto, src: onnx.ModelProto, options: QuantOptions,
                        result: QuantResult) -> None:
    """After ``quantize_static``: every weight whose fp32 original (in ``src``, the graph that was
    quantized) lies on a grid of at most ``L`` levels per scale group (the tensor, or each channel
    of a per-channel scale) gets that grid's step as its scale and the grid's integers: exactly
    ``1/L`` and ``round(w·L)`` for a trained [-1, 1] grid, ``f_c/L`` per channel once BatchNorm
    (factor ``f_c``) is folded in. Otherwise ``quantize_static``'s own scale
    ``2·max|w|/(qmax − qmin)`` would move every weight off the trained grid."""
    L = 2 ** (options.grid_bits - 1) - 1
    qmax = 2 ** (options.weight_bits - 1) - 1
    originals = {i.name: i for i in src.graph.initializer}
    inits = {i.name: i for i in model.graph.initializer}
    weight_inputs = {n.input[1] for n in model.graph.node  # biases and activations stay as they are
                     if n.op_type in WEIGHT_INPUTS and len(n.input) > 1}
    producer = {o: n for n in model.graph.node for o in n.output}
    reader = {n.input[1]: n for n in model.graph.node if n.op_type in WEIGHT_INPUTS and len(n.input) > 2}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits \
                or node.output[0] not in weight_inputs:
            continue
        qname = node.input[0]
        orig = originals.get(qname[:-len("_quantized")]) if qname.endswith("_quantized") else None
        s_init = inits.get(node.input[1])
        zp_init = inits.get(node.input[2]) if len(node.input) > 2 else None
        if orig is None or s_init is None:
            if qname.endswith("_quantized"):
                result.lossy_weights.append(qname)  # a weight we cannot trace: not claimed exact
            continue
        w = numpy_helper.to_array(orig).astype(np.float64)
        scale = numpy_helper.to_array(s_init)
        zp_ok = zp_init is None or not np.any(numpy_helper.to_array(zp_init).astype(np.int64))
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % max(w.ndim, 1)
        groups = ([w] if scale.ndim == 0 else
                  [np.take(w, c, axis=axis) for c in range(w.shape[axis])])
        found = [_grid_integers(g, L, qmax) for g in groups] if zp_ok else [None]
        if any(f is None for f in found):
            result.lossy_weights.append(qname)
            continue
        if scale.ndim == 0:
            k, steps = found[0][0], np.float32(found[0][1])
        else:
            k = np.stack([f[0] for f in found], axis=axis)
            steps = np.array([f[1] for f in found], np.float32)
        q_init = inits[qname]
        q_init.CopyFrom(helper.make_tensor(qname, q_init.data_type, list(w.shape), k.ravel().tolist()))
        new_scale = np.asarray(steps, np.float32).reshape(scale.shape)
        s_init.CopyFrom(numpy_helper.from_array(new_scale, s_init.name))
        if node.output[0] in reader:
            _requantize_bias(reader[node.output[0]], producer, inits, new_scale)
        result.exact_weights.append(qname)


def _requantize_bias(node, producer: dict, inits: dict, w_scale: np.ndarray) -> None:
    """The int32 bias of a QDQ Conv/Gemm ``node`` has scale ``input_scale · weight_scale``;
    onnxruntime fuses the node into QLinearConv only while that holds, so a changed weight scale
    re-scales the bias (its float value unchanged up to the new step's rounding)."""
    x_dq, b_dq = producer.get(node.input[0]), producer.get(node.input[2])
    if x_dq is None or b_dq is None or x_dq.op_type != "DequantizeLinear" \
            or b_dq.op_type != "DequantizeLinear" or b_dq.input[0] not in inits:
        return
    x_scale = numpy_helper.to_array(inits[x_dq.input[1]]).astype(np.float64)
    b_int, b_scale = inits[b_dq.input[0]], inits[b_dq.input[1]]
    value = numpy_helper.to_array(b_int).astype(np.float64) * numpy_helper.to_array(b_scale)
    step = (x_scale * w_scale.astype(np.float64)).astype(np.float32)
    shape = numpy_helper.to_array(b_scale).shape
    step = np.broadcast_to(step, value.shape)
    ints = np.round(value / step).astype(np.int32)
    b_int.CopyFrom(numpy_helper.from_array(ints, b_int.name))
    b_scale.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(step).reshape(shape) if shape
                                             else np.float32(step.flat[0]), b_scale.name))


# -- weights only (hand-written QDQ; see the module docstring for why) -----------------------------

def _weight_initializers(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """Initializer name -> (op, input index) for the weights of Conv/ConvTranspose/Gemm/MatMul."""
    inits = {i.name for i in model.graph.initializer}
    found: dict[str, tuple[str, int]] = {}
    for node in model.graph.node:
        for idx in WEIGHT_INPUTS.get(node.op_type, ()):
            if idx < len(node.input) and node.input[idx] in inits:
                if node.op_type == "Gemm" and idx == 0:
                    continue  # Gemm's A is the activation in every exported classifier
                found.setdefault(node.input[idx], (node.op_type, idx, node))  # type: ignore[arg-type]
    return found  # type: ignore[return-value]


def _channel_axis(op: str, idx: int, node, ndim: int) -> int | None:
    if ndim < 2:
        return None
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return 1 if group == 1 else None   # grouped: channels span two axes, use one scale
    if op == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if op == "MatMul":
        return ndim - 1 if idx == 1 else None
    return None


def _set_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= version:
        return model
    # Not onnx.version_converter: it litters the graph with Identity nodes. The ops an exported
    # classifier uses did not change meaning between opsets 18 and 21 (only new integer types).
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = version
    return model


def _weights_only(model: onnx.ModelProto, options: QuantOptions, result: QuantResult) -> onnx.ModelProto:
    bits = options.weight_bits
    qmax = 2 ** (bits - 1) - 1
    dtype = TensorProto.INT4 if bits == 4 else TensorProto.INT8
    grid = 2 ** (options.grid_bits - 1) - 1 if options.grid_bits else None
    if grid is not None and grid > qmax:
        result.notes.append(f"the {options.grid_bits}-bit training grid does not fit in int{bits}; "
                            "weights are requantized (lossy)")
        grid = None
    model = _set_opset(model, INT_OPSET)
    weights = _weight_initializers(model)
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes = []
    for name, (op, idx, node) in weights.items():
        init = inits[name]
        w = numpy_helper.to_array(init)
        if w.dtype not in (np.float32, np.float64) or w.size == 0:
            continue
        w64 = w.astype(np.float64)
        axis = _channel_axis(op, idx, node, w.ndim) if options.per_channel else None
        nch = w.shape[axis] if axis is not None else 1
        exact = grid is not None and np.abs(w64).max() <= 1.0 + 1e-6 and \
            np.abs(w64 * grid - np.round(w64 * grid)).max() <= 1e-4
        if exact:
            q = np.round(w64 * grid)
            scale = np.full(nch, 1.0 / grid) if axis is not None else np.asarray(1.0 / grid)
            result.exact_weights.append(name)
        else:
            if axis is not None:
                red = tuple(a for a in range(w.ndim) if a != axis)
                m = np.abs(w64).max(axis=red)
            else:
                m = np.asarray(np.abs(w64).max())
            scale = np.where(m > 0, m / qmax, 1.0)
            shaped = scale if axis is None else scale.reshape([-1 if a == axis else 1 for a in range(w.ndim)])
            q = np.clip(np.round(w64 / shaped), -qmax, qmax)
            result.lossy_weights.append(name)
        qname, sname, zname = f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"
        zshape = [nch] if axis is not None else []
        model.graph.initializer.append(
            helper.make_tensor(qname, dtype, list(w.shape), q.astype(np.int64).ravel().tolist()))
        model.graph.initializer.append(
            numpy_helper.from_array(np.asarray(scale, np.float32).reshape(zshape), sname))
        model.graph.initializer.append(
            helper.make_tensor(zname, dtype, zshape, [0] * (nch if axis is not None else 1)))
        attrs = {"axis": axis} if axis is not None else {}
        new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname, zname], [name],
                                          name=f"{name}_DequantizeLinear", **attrs))
        model.graph.initializer.remove(init)
    if any(op == "MatMul" for op, _, _ in weights.values()):
        result.notes.append("onnxruntime rewrites DequantizeLinear -> MatMul into MatMulNBits, which by "
                            "default quantizes activations to int8; for exact results set session "
                            "option session.qdq_matmulnbits_accuracy_level=0 (as verify does)")
    # the dequantized weights keep the initializers' names, so consumers are untouched
    for vi in list(model.graph.input):
        if vi.name in weights:
            model.graph.input.remove(vi)
    for n in reversed(new_nodes):
        model.graph.node.insert(0, n)
    return model


# -- comparing a quantized file with its fp32 model ------------------------------------------------

def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Top-1 agreement, per-sample cosine (mean and min), SQNR in dB, max abs / relative error."""
    ref = np.asarray(reference, np.float64).reshape(len(reference), -1)
    out = np.asarray(candidate, np.float64).reshape(len(candidate), -1)
    if ref.shape != out.shape:
        raise UserInputError(f"logit shapes differ: {ref.shape} vs {out.shape}")
    err = out - ref
    max_abs = float(np.abs(err).max()) if err.size else 0.0
    denom = float(np.abs(ref).max()) if ref.size else 0.0
    rel = max_abs / denom if denom > 0 else (0.0 if max_abs == 0 else float("inf"))
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cos = np.where(norms > 0, (ref * out).sum(1) / np.where(norms > 0, norms, 1.0), 1.0)
    noise = float((err ** 2).sum())
    signal = float((ref ** 2).sum())
    sqnr = float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-300) / noise)
    return {"samples": int(len(ref)),
            "top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean()) if ref.size else 1.0,
            "cosine_mean": float(cos.mean()) if cos.size else 1.0,
            "cosine_min": float(cos.min()) if cos.size else 1.0,
            "sqnr_db": sqnr, "max_abs": max_abs, "rel": rel}


def run_file(path: Path, x: np.ndarray, batch: int = 64, optimized: bool = True) -> np.ndarray:
    sess = ort_session(path, optimized)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: np.ascontiguousarray(x[i:i + batch], np.float32)})[0]
            for i in range(0, len(x), batch)]
    return np.concatenate(outs).astype(np.float32)


def compare_files(fp32_path: Path, quant_path: Path, x: np.ndarray) -> dict:
    return compare_logits(run_file(fp32_path, x), run_file(quant_path, x))


def weight_storage(path: Path) -> dict:
    """Counts of integer initializers feeding DequantizeLinear nodes, by element type."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    kinds: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            t = TensorProto.DataType.Name(inits[n.input[0]].data_type).lower()
            kinds[t] = kinds.get(t, 0) + 1
    return kinds
