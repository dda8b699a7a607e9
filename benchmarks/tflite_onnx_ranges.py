"""The activation ranges of a run's model.int8.tflite against its model.int8.onnx, tensor by tensor
(docs/results.md, issue 18: "Top-1 of the .tflite against the run's ONNX int8 file").

    python benchmarks/tflite_onnx_ranges.py RUN

Each int8 activation tensor of the .tflite is named like the ONNX integer tensor it holds; prints
those whose scale or zero point differs (a uint8 ONNX zero point counts shifted by 128, the same
integers in int8), then the counts: same, different, and tensors the ONNX file has no
QuantizeLinear for (the .tflite's PAD outputs, and its int8 logits where onnxruntime leaves them float).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from wnconvert.convert.tflite.flatbuf import parse


def compare(run: Path) -> dict:
    model = onnx.load(str(run / "model.int8.onnx"))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ranges = {n.output[0]: (init[n.input[1]], init[n.input[2]]) for n in model.graph.node
              if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    same, differ, absent = [], [], []
    for t in parse((run / "model.int8.tflite").read_bytes()).tensors:
        if t.data is not None or not t.quantized:
            continue
        if t.name not in ranges:
            absent.append(t.name)
            continue
        scale, zp = ranges[t.name]
        zp8 = int(zp) - (128 if zp.dtype == np.uint8 else 0)
        ok = float(scale) == float(t.scale[0]) and zp8 == int(t.zero_point[0])
        (same if ok else differ).append(t.name)
        if not ok:
            print(f"{t.name}: model.int8.onnx {float(scale):.6g} / {int(zp)}, .tflite {float(t.scale[0]):.6g} / "
                  f"{int(t.zero_point[0])}")
    return {"same": len(same), "differ": len(differ), "not_in_onnx": absent}


if __name__ == "__main__":
    r = compare(Path(sys.argv[1]))
    print(f"same {r['same']}, different {r['differ']}, not in the ONNX file: {', '.join(r['not_in_onnx'])}")
