"""Running a .tflite classifier on float NCHW images: TensorFlow Lite Micro or LiteRT.

:func:`tflite_runner` gives ``(images -> logits, backend, input size)`` for ``wnconvert eval
RUN/model.int8.tflite``: each image is transposed to NHWC and quantized with the file's input
quantization (``clamp(round_half_even(x / s) + z)``, the rounding of the trained network's input
point) when the input is int8, passed as float32 when it is float (``--io float``); int8 logits are
dequantized with the output's scale and zero point. Both interpreters take one image per call (the
file's batch of 1: a RESHAPE's shape constant holds it).

The file is read once (:func:`read_tflite`) and parsed with the schema bindings before any
interpreter sees it: a truncated or crafted file is one line, not a crash inside C++.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserInputError
from .names import TFLITE_RUNTIMES


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str            # INT8 | FLOAT32 | ...
    scale: float
    zero_point: int


def read_tflite(path: Path) -> bytes:
    """The bytes of ``path``, checked to be a readable TFLite flatbuffer (one line otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path} does not exist")
    data = path.read_bytes()
    io_tensors(data, str(path))
    return data


def io_tensors(data: bytes, where: str) -> tuple[TensorInfo, TensorInfo]:
    """The first input and output tensors of subgraph 0."""
    import tflite

    types = {v: k for k, v in vars(tflite.TensorType).items() if isinstance(v, int)}
    try:
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise ValueError("no TFL3 identifier")
        model = tflite.Model.GetRootAsModel(data, 0)
        sg = model.Subgraphs(0)
        infos = []
        for idx in (sg.Inputs(0), sg.Outputs(0)):
            t = sg.Tensors(idx)
            q = t.Quantization()
            scale = float(q.Scale(0)) if q is not None and q.ScaleLength() else 0.0
            zp = int(q.ZeroPoint(0)) if q is not None and q.ZeroPointLength() else 0
            infos.append(TensorInfo(tuple(int(v) for v in t.ShapeAsNumpy()), types.get(t.Type(), "?"), scale, zp))
    except Exception as e:  # a crafted flatbuffer raises anything from struct.error to IndexError
        raise UserInputError(f"{where} is not a readable .tflite file ({type(e).__name__})") from None
    inp, out = infos
    if len(inp.shape) != 4 or inp.shape[-1] not in (1, 3):
        raise UserInputError(f"{where}: input shape {inp.shape} is not an NHWC image")
    if len(out.shape) != 2:
        raise UserInputError(f"{where}: output shape {out.shape} is not (batch, classes) logits")
    for t, what in ((inp, "input"), (out, "output")):
        if t.dtype not in ("INT8", "FLOAT32") or (t.dtype == "INT8" and t.scale <= 0):
            raise UserInputError(f"{where}: the {what} is {t.dtype} without a usable scale; int8 or float32 expected")
    return inp, out


def quantize_input(x: np.ndarray, t: TensorInfo) -> np.ndarray:
    """NCHW float images -> the file's NHWC input."""
    nhwc = np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1))
    if t.dtype == "FLOAT32":
        return nhwc
    k = np.round(nhwc / np.float32(t.scale)) + t.zero_point
    return np.clip(k, -128, 127).astype(np.int8)


def dequantize_output(y: np.ndarray, t: TensorInfo) -> np.ndarray:
    if t.dtype == "FLOAT32":
        return np.asarray(y, np.float32)
    return ((np.asarray(y, np.int64) - t.zero_point) * np.float32(t.scale)).astype(np.float32)


def tflite_runner(path: Path, runtime: str = "tflite-micro"):
    """``(x -> logits, backend name, input height)`` for the .tflite file ``path``."""
    if runtime not in TFLITE_RUNTIMES:
        raise UserInputError(f"{path} is a .tflite file: it runs in {' or '.join(TFLITE_RUNTIMES)}, not {runtime}")
    data = read_tflite(path)
    inp, out = io_tensors(data, str(path))
    if runtime == "tflite-micro":
        try:
            from tflite_micro import runtime as micro
        except ImportError:
            raise UserInputError("TensorFlow Lite Micro's Python interpreter is not installed: "
                                 "pip install tflite-micro") from None
        try:
            it = micro.Interpreter.from_bytes(data)
        except Exception as e:
            raise UserInputError(f"TensorFlow Lite Micro cannot load {path}: {str(e).splitlines()[0][:200]}") from None

        def run(x: np.ndarray) -> np.ndarray:
            q = quantize_input(x, inp)
            rows = []
            for i in range(len(q)):
                it.set_input(q[i:i + 1], 0)
                it.invoke()
                rows.append(dequantize_output(it.get_output(0), out))
            return np.concatenate(rows)
        return run, "tflite-micro (reference kernels)", inp.shape[1]
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise UserInputError("LiteRT is not installed: pip install ai-edge-litert") from None
    try:
        lit = Interpreter(model_content=data)
        lit.allocate_tensors()
    except Exception as e:
        raise UserInputError(f"LiteRT cannot load {path}: {str(e).splitlines()[0][:200]}") from None
    in_idx = lit.get_input_details()[0]["index"]
    out_idx = lit.get_output_details()[0]["index"]

    def run_lit(x: np.ndarray) -> np.ndarray:
        # one image per call, as the file's batch of 1: a RESHAPE holds that batch in its shape
        # constant, so a resized input fails in LiteRT's prepare (ResNet's flatten)
        q = quantize_input(x, inp)
        rows = []
        for i in range(len(q)):
            lit.set_tensor(in_idx, q[i:i + 1])
            lit.invoke()
            rows.append(dequantize_output(lit.get_tensor(out_idx), out))
        return np.concatenate(rows)
    return run_lit, "litert (default resolver)", inp.shape[1]
