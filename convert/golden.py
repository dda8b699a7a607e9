"""Golden vectors: every quantized tensor of an integer run, for a hardware team to compare with.

Format (a directory with two files)::

    golden.npz   one integer array per quantized tensor, keyed by the ONNX tensor name (the output
                 of its QuantizeLinear), batch first: the quantized network input and every layer.
                 int8/uint8 arrays; int4/uint4 tensors are stored widened to int8/uint8. A
                 Conv/Gemm/MatMul whose float output leaves the graph unquantized (logits) is
                 stored as its int32 accumulator (op kind "acc", scale s_x·s_w, zero point 0).
    index.json   {"format": "wnconvert-golden/1", "inputs": <what the images are>,
                  "network_input": <name of the quantized input tensor>, "images": N,
                  "integer_only": <bool, every layer requantized by shifts>,
                  "layers": [ one object per tensor, in graph order:
                    {"tensor", "op", "kind", "node", "shape", "dtype",
                     "output_scale": {"value": 0.125, "log2": -3} (lists per channel for an
                     int32 accumulator output), "zero_point",
                     "input_scales": [{"value", "log2"}...], "input_zero_points": [...],
                     "weight_scales": {"values": [...], "log2": [...]} or null,
                     "shift": n or [n per channel] or null,
                     "integer_only", "reason", "max_abs_acc", "max_abs_partial",
                     "acc_over_2_24", "partial_over_2_24", "int32_overflow"} ]}

``log2`` is the exponent ``e`` of a power-of-two scale (``scale == 2**e`` exactly), ``null`` when the
scale is not one. ``shift`` is the right shift of the layer's requantization:
``y = clamp(round_half_even(acc / 2**shift) + zero_point)`` with ``acc = sum (x - z_x)·w + bias``
in int32 (a negative shift is a left shift); ``null`` where the layer fell back to a float32
multiplier (``integer_only`` false, ``reason`` says why). ``max_abs_acc`` / ``*_over_2_24``: see
:mod:`wnconvert.convert.intref.run`.

Reading it::

    import json, numpy as np
    index = json.load(open("golden/index.json"))
    golden = np.load("golden/golden.npz")
    for layer in index["layers"]:
        expected = golden[layer["tensor"]]          # shape layer["shape"], dtype layer["dtype"]
        mine = my_hardware_output(layer["tensor"])  # the integers your RTL / firmware produced
        assert np.array_equal(mine, expected), layer["node"]
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import numpy as np

from .artifacts import atomic_path, ensure_writable_dir, write_json
from .errors import UserInputError
from .intref import IntegerRun, QTensor, is_power_of_two, run_integer

FORMAT = "wnconvert-golden/1"
NPZ, INDEX = "golden.npz", "index.json"


def _scale(value: float | list[float]) -> dict:
    if isinstance(value, list):  # a per-channel accumulator scale
        return {"value": value, "log2": [is_power_of_two(v) for v in value]}
    return {"value": float(value), "log2": is_power_of_two(value)}


def _layer(t: QTensor) -> dict:
    weights = None
    if t.weight_scales is not None:
        weights = {"values": t.weight_scales, "log2": [is_power_of_two(v) for v in t.weight_scales]}
    return {"tensor": t.name, "op": t.op, "kind": t.kind, "node": t.node, "shape": list(t.values.shape),
            "dtype": t.dtype,
            "output_scale": _scale(t.scale), "zero_point": t.zero_point,
            "input_scales": [_scale(s) for s in t.input_scales], "input_zero_points": t.input_zero_points,
            "weight_scales": weights, "shift": t.shift, "integer_only": t.integer_only, "reason": t.reason,
            "max_abs_acc": t.max_abs_acc, "max_abs_partial": t.max_abs_partial,
            "acc_over_2_24": t.acc_over_2_24, "partial_over_2_24": t.partial_over_2_24,
            "int32_overflow": t.int32_overflow}


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` written member by member (any tensor name is a valid key), atomically."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name, arr in arrays.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def write_golden(run: IntegerRun, out_dir: Path, inputs_name: str) -> dict:
    """Write ``golden.npz`` and ``index.json`` into ``out_dir``; returns the index."""
    out_dir = ensure_writable_dir(Path(out_dir))
    first = next(iter(run.tensors.values()), None)
    index = {"format": FORMAT, "inputs": inputs_name, "network_input": run.input_name,
             "images": int(first.values.shape[0]) if first is not None and first.values.ndim else 0,
             "integer_only": run.integer_only, "layers": [_layer(t) for t in run.tensors.values()]}
    _write_npz(out_dir / NPZ, run.arrays())
    write_json(out_dir / INDEX, index)
    return index


def read_golden(directory: Path) -> dict:
    """``{"index": <index.json>, "arrays": {tensor name: array}}``, checked against each other."""
    directory = Path(directory)
    try:
        index = json.loads((directory / INDEX).read_text())
        with np.load(directory / NPZ, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except FileNotFoundError as e:
        raise UserInputError(f"no golden vectors in {directory}: {Path(e.filename).name} is missing") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserInputError(f"cannot read golden vectors in {directory}: {e}") from None
    if index.get("format") != FORMAT:
        raise UserInputError(f"{directory / INDEX} is not a {FORMAT} index")
    for layer in index["layers"]:
        arr = arrays.get(layer["tensor"])
        if arr is None or list(arr.shape) != layer["shape"]:
            raise UserInputError(f"{directory / NPZ} does not hold tensor '{layer['tensor']}' as indexed")
    return {"index": index, "arrays": arrays}


def golden_for_file(onnx_path, x_float: np.ndarray, out_dir: Path, inputs_name: str = "") -> dict:
    """Run the integer reference of ``onnx_path`` on ``x_float`` and write its golden vectors.

    Returns a summary for a command to render: where the files are, how many tensors and images,
    which layers are not integer-only or exceed float32's exact range, and the time per image.
    """
    start = time.perf_counter()
    run = run_integer(onnx_path, x_float)
    index = write_golden(run, Path(out_dir), inputs_name or f"{len(x_float)} image(s)")
    images = max(index["images"], 1)
    return {"out_dir": str(out_dir), "files": [NPZ, INDEX], "tensors": len(run.tensors),
            "images": index["images"], "integer_only": run.integer_only,
            "not_integer_only": [t.name for t in run.tensors.values() if not t.integer_only],
            "over_2_24": run.over_2_24(),
            "int32_overflow": [t.name for t in run.tensors.values() if t.int32_overflow],
            "reference_ms_per_image": 1000 * run.seconds / images,
            "seconds": time.perf_counter() - start}
