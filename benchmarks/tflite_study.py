"""TensorFlow Lite Micro against the integer reference and the run's int8 network, and top-1 of the
.tflite against the run's ONNX int8 file, on test images (docs/results.md, "TensorFlow Lite Micro").

    python benchmarks/tflite_study.py RUN [RUN ...] --count 1000 [--json out.json]

For each run: ``model.int8.tflite`` is exported if missing (``export --target tflite-micro``) and
``model.int8.onnx`` likewise (``export --precision int8``); then on ``--count`` test images:
* elements of every tensor where TensorFlow Lite Micro equals the TFLite-arithmetic reference;
* elements one step from the run's int8 network recomputed on TFLite's inputs (and more than one);
* top-1 (against the labels) of the .tflite in TensorFlow Lite Micro, of the run's int8 network
  the file was made from (onnxruntime) and of ``model.int8.onnx`` (onnxruntime), and the .tflite's
  top-1 agreement with each; milliseconds per image of TensorFlow Lite Micro and the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("WNCONVERT_OFFLINE", "1")


def _ensure_files(run: Path) -> None:
    from wnconvert.models.run.run_export import export_precision
    from wnconvert.models.run.run_options import PrecisionOptions
    from wnconvert.models.run.run_tflite import export_tflite

    if not (run / "model.int8.onnx").exists():
        export_precision(run, "int8", PrecisionOptions())
    if not (run / "model.int8.tflite").exists():
        export_tflite(run, PrecisionOptions(target="tflite-micro"))


def measure(run: Path, count: int, chunk: int = 50) -> dict:
    import onnx

    from wnconvert.convert.intref import run_integer
    from wnconvert.convert.runtime import ort_session, run_batches, session_runner
    from wnconvert.convert.tflite import reference
    from wnconvert.convert.tflite.flatbuf import parse, read_file
    from wnconvert.convert.tflite.writer import Writer
    from wnconvert.models.data.data import eval_arrays
    from wnconvert.models.run.run_tflite import recorded_options, source_network
    from wnconvert.models.run.rundir import RunDir
    from wnconvert.models.run.tflite_verify import (
        _from_onnx,
        _micro,
        _to_onnx,
        local_model_check,
        output_name,
    )

    _ensure_files(run)
    rd = RunDir(run)
    manifest = rd.manifest()
    images, labels = eval_arrays(manifest.data, manifest.preprocess, limit=count, split="val")
    data = read_file(run / "model.int8.tflite")
    model = parse(data)
    opts, io = recorded_options(manifest)
    source, info = source_network(rd, opts)
    writer = Writer(source, io)
    expected = writer.translate()
    name = output_name(expected)
    with tempfile.TemporaryDirectory() as tmp:
        src_path = Path(tmp) / "source.onnx"
        onnx.save(source, str(src_path))
        src_logits = run_batches(session_runner(ort_session(src_path)), images)
    onnx_logits = run_batches(session_runner(ort_session(run / "model.int8.onnx")), images)
    equal = total = one = more = of = 0
    micro_s = ref_s = 0.0
    tfl_top = []
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk]
        net = run_integer(source, x)
        x_in = _from_onnx(net.tensors[net.input_name].values, writer.held[net.input_name]).astype(np.int8)
        t = time.perf_counter()
        env = reference.run(model, x_in)
        ref_s += time.perf_counter() - t
        t = time.perf_counter()
        micro = _micro(data, x_in, model)
        micro_s += time.perf_counter() - t
        for j, got in micro.items():
            equal += int(np.count_nonzero(got.astype(np.int64).reshape(-1) == env[j].reshape(-1)))
            total += got.size
        counts, _ = local_model_check(source, writer, env)
        for c in counts.values():
            one += c["one_step"]
            of += c["elements"]
        # the elements more than one step away (local_model_check names only the first tensor)
        more += sum(1 for c in counts.values() if c["max_steps"] > 1)
        held = writer.held[name]
        tfl_top.append(_to_onnx(env[held.index], held).reshape(len(x), -1).argmax(1))
    tfl_top = np.concatenate(tfl_top)
    labels = np.asarray(labels)
    return {"run": str(run), "scales": info["scales"], "scale_format": info.get("scale_format"),
            "images": len(images), "operators": sorted({o.op for o in model.ops}),
            "micro_equals_reference": {"equal": equal, "of": total},
            "one_step": {"elements": one, "of": of, "tensors_beyond_one_step": more},
            "top1": {"tflite": float(np.mean(tfl_top == labels)),
                     "network": float(np.mean(src_logits.argmax(1) == labels)),
                     "onnx_int8": float(np.mean(onnx_logits.argmax(1) == labels)),
                     "agreement_network": float(np.mean(tfl_top == src_logits.argmax(1))),
                     "agreement_onnx_int8": float(np.mean(tfl_top == onnx_logits.argmax(1)))},
            "ms_per_image": {"micro": 1000 * micro_s / len(images), "reference": 1000 * ref_s / len(images)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = [measure(r, a.count) for r in a.runs]
    print("| run | scales | images | TFLM = reference | one step from the network | top-1 .tflite | "
          "top-1 network | top-1 model.int8.onnx | agreement with network / onnx int8 | "
          "TFLM / reference ms per image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, o, t, ms = r["micro_equals_reference"], r["one_step"], r["top1"], r["ms_per_image"]
        fmt = f"{r['scales']}" + (f", {r['scale_format']}" if r["scale_format"] else "")
        print(f"| {Path(r['run']).name} | {fmt} | {r['images']} | {m['equal']}/{m['of']} "
              f"({100 * m['equal'] / m['of']:.2f} %) | {o['elements']}/{o['of']} ({100 * o['elements'] / o['of']:.3f} "
              "%), "
              f"{o['tensors_beyond_one_step']} beyond | {100 * t['tflite']:.2f} | {100 * t['network']:.2f} | "
              f"{100 * t['onnx_int8']:.2f} | {t['agreement_network']:.4f} / {t['agreement_onnx_int8']:.4f} | "
              f"{ms['micro']:.1f} / {ms['reference']:.1f} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
