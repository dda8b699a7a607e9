"""CPU speed of the fp32 / int8 / int4 files of each deployment target in onnxruntime and in
OpenVINO, and how closely OpenVINO reproduces onnxruntime's logits, from wnconvert's own commands
(``finetune``, ``export --target``, ``eval --runtime``).

    python benchmarks/runtimes_speed.py --runs runs/speed [--no-resnet50]

Runs it makes or reuses: ``r18-32`` (ResNet-18 at 32 px trained one epoch on 4096 Fashion-MNIST
images, int8 calibrated on 256 of the run's own training images; speed and agreement on 1000 test
images) and ``r50-224`` (ResNet-50, untrained, 224 px; int8 calibrated on 32 synthetic images,
speed on 256 of them, agreement not measured: an untrained network's logits are near ties).
Files: ``model.onnx`` (fp32), ``export --precision int8`` for the ort-cpu target (uint8
activations, int32 biases), the openvino target (the same, less the Q/DQ pair between a Conv and
the residual Add OpenVINO fuses into it) and the tensorrt target (int8 symmetric activations;
TensorRT itself is not run here), ``export --precision int4`` (int4 weights, float activations).

Speed: images/s of ``wnconvert eval --batch-size 64 --runtime R`` (onnxruntime: CPU provider, all
graph optimizations; OpenVINO: CPU plugin, f32 inference precision), best of ``--repeats``. Run it
on an otherwise idle machine: contention distorts the ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from study_runs import ensure, wnconvert

from wnconvert.convert.openvino_rt import run_runtime
from wnconvert.models.data.data import eval_arrays
from wnconvert.models.run.rundir import RunDir

RUNTIMES = ("onnxruntime", "openvino")
FILES = (("fp32", "model.onnx", None), ("int8 ort-cpu", "model.int8-ort-cpu.onnx", "ort-cpu"),
         ("int8 openvino", "model.int8-openvino.onnx", "openvino"),
         ("int8 tensorrt", "model.int8-tensorrt.onnx", "tensorrt"), ("int4 weights", "model.int4.onnx", None))


def speed(path: Path, data: str, limit: int, runtime: str, repeats: int) -> dict:
    """``wnconvert eval --runtime`` of ``path``, best of ``repeats`` (noise only slows a run down)."""
    args = ["eval", path, "--data", data, "--batch-size", 64, "--limit", limit, "--runtime", runtime]
    runs = [wnconvert(args, capture_json=True) for _ in range(repeats)]
    return runs[0] | {"images_per_s": max(r["images_per_s"] for r in runs),
                      "images_per_s_runs": [r["images_per_s"] for r in runs]}


def make_files(run: Path, calib: list) -> None:
    """Every file of FILES in ``run``: one int8 export per target, kept under its own name."""
    for _, name, target in FILES:
        if target and not (run / name).exists():
            wnconvert(["export", run, "--precision", "int8", "--target", target, *calib])
            shutil.copyfile(run / "model.int8.onnx", run / name)
    if not (run / "model.int4.onnx").exists():
        wnconvert(["export", run, "--precision", "int4"])


def agreement(run: Path, data: str, limit: int) -> dict:
    """OpenVINO's logits against onnxruntime's, per file, on ``limit`` validation images."""
    x = eval_arrays(data, RunDir(run).manifest().preprocess, limit=limit)[0]
    out = {}
    for label, name, _ in FILES:
        a, b = (run_runtime(rt, run / name, x) for rt in RUNTIMES)
        out[label] = {"top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
                      "max_abs_diff": float(np.abs(a - b).max()),
                      "rel": float(np.abs(a - b).max() / np.abs(a).max()),
                      "identical": float((a == b).mean())}
    return out


def table(title: str, res: dict, agree: dict | None) -> list[str]:
    head = (f"| {title} | " + " | ".join(f"{rt} images/s (× its fp32)" for rt in RUNTIMES)
            + " | openvino / onnxruntime |")
    lines = [head + (" top-1 agreement, max logit diff |" if agree else ""),
             "| --- " * (4 + bool(agree)) + "|"]
    for label, _, _ in FILES:
        cells = []
        for rt in RUNTIMES:
            v, base = res[rt][label]["images_per_s"], res[rt]["fp32"]["images_per_s"]
            cells.append(f"{v:.1f} ({v / base:.2f}×)")
        ratio = res["openvino"][label]["images_per_s"] / res["onnxruntime"][label]["images_per_s"]
        row = f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f}× |"
        if agree:
            a = agree[label]
            row += f" {a['top1_agreement']:.3f}, {a['max_abs_diff']:.1e} (rel {a['rel']:.1e}) |"
        lines.append(row)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/speed"))
    ap.add_argument("--no-resnet50", action="store_true", help="skip the ResNet-50 224 px rows")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    r18, r50 = args.runs / "r18-32", args.runs / "r50-224"
    ensure(["finetune", "resnet18", "--weights", "none", "--data", "fashion-mnist", "--epochs", 1,
            "--limit-train", 4096, "--limit-val", 1000, "--device", "cpu", "--seed", 0, "--out", r18])
    cases = [("ResNet-18, 32 px, trained", r18, "fashion-mnist", [], 1000, True)]
    if not args.no_resnet50:
        ensure(["finetune", "resnet50", "--weights", "none", "--num-classes", 10, "--epochs", 0,
                "--image-size", 224, "--samples", 2, "--device", "cpu", "--out", r50])
        cases.append(("ResNet-50, 224 px, untrained", r50, "synthetic:10",
                      ["--data", "synthetic:10", "--calib-samples", 32], 256, False))
    out, lines = {}, []
    for title, run, data, calib, limit, agree in cases:
        make_files(run, calib)
        res = {rt: {label: speed(run / name, data, limit, rt, args.repeats) for label, name, _ in FILES}
               for rt in RUNTIMES}
        agreed = agreement(run, data, limit) if agree else None
        out[title] = {"speed": res, "agreement": agreed}
        lines += table(title, res, agreed) + [""]
    print("\n".join(lines))
    (args.runs / "runtimes_speed.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.runs / "runtimes_speed.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
