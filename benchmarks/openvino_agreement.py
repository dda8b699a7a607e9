"""OpenVINO against onnxruntime on the same ONNX files: top-1 agreement and the largest logit
difference on real images, and, with ``--cut``, where two int8 files part ways: each file cut after
every QuantizeLinear (that tensor made the only output) and both runtimes compared on it.

    python benchmarks/openvino_agreement.py RUN FILE [FILE ...] [--limit 1000] [--cut 64]

``RUN`` is the run directory whose data and preprocessing give the images (its validation split);
each ``FILE`` an ONNX file (a path, or a name inside RUN). onnxruntime runs unoptimized for the
cut (its float kernels between Q/DQ, the QDQ semantics as written) and with all optimizations for
the agreement; OpenVINO's CPU plugin at f32 inference precision. The cut prints, per quantized
tensor in graph order, the fraction of its integers equal in both runtimes and the largest
difference in steps. docs/results.md and convert/quantize/placement.py quote its output.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from wnconvert.convert.metrics import compare_logits
from wnconvert.convert.openvino_rt import ov_compile, run_runtime
from wnconvert.models.data.data import eval_arrays
from wnconvert.models.run.rundir import RunDir


def cut(path: Path, x: np.ndarray) -> None:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    name = model.graph.input[0].name
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        for node in model.graph.node:
            if node.op_type != "QuantizeLinear" or node.input[0] in {i.name for i in model.graph.initializer}:
                continue
            part = onnx.utils.Extractor(model).extract_model([name], [node.output[0]])
            file = Path(tmp) / "part.onnx"
            onnx.save(part, str(file))
            a = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
            compiled = ov_compile(file)
            b = compiled.create_infer_request().infer([x])[compiled.output(0)]
            d = np.abs(a.astype(np.int64) - b.astype(np.int64))
            print(f"  {node.output[0][:70]:70s} equal {np.mean(d == 0):.4f}  max {int(d.max())} steps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--limit", type=int, default=1000, help="images for the agreement")
    ap.add_argument("--cut", type=int, default=0, metavar="N", help="also cut each file, on N images")
    args = ap.parse_args()
    manifest = RunDir(args.run).manifest()
    x = eval_arrays(manifest.data, manifest.preprocess, limit=args.limit)[0]
    for f in args.files:
        path = Path(f) if Path(f).exists() else args.run / f
        c = compare_logits(run_runtime("onnxruntime", path, x), run_runtime("openvino", path, x))
        print(f"{path}: top-1 agreement {c['top1_agreement']:.3f} on {len(x)} images, "
              f"largest logit difference rel {c['rel']:.3g}")
        if args.cut:
            cut(path, x[:args.cut])


if __name__ == "__main__":
    main()
