"""Low-bit deployment study: test accuracy and CPU speed of fp32 / int8 W8A8 / int4-weight ONNX files,
for a plain baseline quantized after training and for its layer-max and channel-max fine-tunes with
and without ``--weight-bits 4``. Every number comes from ``wnconvert eval`` (onnxruntime, CPU) on
the real test set; every file from ``wnconvert finetune`` / ``wnconvert export``.

    python benchmarks/lowbit_study.py --runs runs/study --docs docs/figures

Runs it makes or reuses (study_runs.ensure): ``baseline`` (ResNet-18 from scratch, --scheme none),
``lm-adamw`` / ``cm-adamw`` (shared with dynamics_study.py) and ``lm-adamw-w4`` / ``cm-adamw-w4``
(the same fine-tunes with 4-bit weight fake-quant). Files per run:

* fp32: ``model.onnx``;
* int8: ``export --precision int8 --data D --calib-samples 256`` (W8A8 QDQ, MinMax, calibrated on
  training images);
* int4: ``export --precision int4`` (int4 weights in QDQ, float activations; per tensor for
  layer-max, per channel otherwise; lossless for a ``--weight-bits 4`` run). The baseline also gets
  a per-tensor int4 file (``--per-tensor``), the setting of the issue's reference figure.

Speed: images/s of ``wnconvert eval`` over the test set (batch 64, onnxruntime CPU provider, all
graph optimizations), best of three evaluations, as a ratio to the run's fp32 file; and, because 32 px images leave the
network little work per layer, the same ratios for an untrained ResNet-50 at 224 px (speed only).
The same in OpenVINO (``wnconvert eval --runtime openvino``: CPU plugin, f32 inference precision;
best of three, as a ratio to the same file's fp32 in OpenVINO; its accuracy goes to the JSON
only), unless ``--no-openvino``.
Run it on an otherwise idle machine: the ratios are what matters, and contention distorts them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dynamics_study import runs as dynamics_runs
from study_runs import Recipe, ensure, parser, shown, start, wnconvert

CALIB = 256


def plan(recipe: Recipe, eq_epochs: int, every: int) -> dict[str, list[str]]:
    shared = dynamics_runs(recipe, eq_epochs, every)
    out = {"lm-adamw": shared["lm-adamw"], "cm-adamw": shared["cm-adamw"]}
    for scheme, short in (("layer-max", "lm"), ("channel-max", "cm")):
        name = f"{short}-adamw-w4"
        out[name] = recipe.finetune_args(name, scheme, "--optimizer", "adamw", "--weight-bits", 4,
                                         "--diagnostics", every)
    return out


def files(run: Path, data: str, baseline: bool) -> dict[str, Path]:
    """Export the low-precision files of ``run``; label -> path."""
    out = {"fp32": run / "model.onnx"}
    wnconvert(["export", run, "--precision", "int8", "--data", data, "--calib-samples", CALIB])
    out["int8 W8A8"] = run / "model.int8.onnx"
    if baseline:
        wnconvert(["export", run, "--precision", "int4", "--per-tensor"])
        shutil.copyfile(run / "model.int4.onnx", run / "model.int4-per-tensor.onnx")
        out["int4 weights, per tensor"] = run / "model.int4-per-tensor.onnx"
    wnconvert(["export", run, "--precision", "int4"])
    out["int4 weights"] = run / "model.int4.onnx"
    return out


def evaluate(path: Path, data: str, limit: int | None = None, repeats: int = 3,
             runtime: str = "onnxruntime") -> dict:
    """``wnconvert eval --runtime R`` of ``path``; its speed is the best of ``repeats`` evaluations
    (a 2-core machine's background noise only ever slows a run down), its accuracy that of any of
    them."""
    args = ["eval", path, "--data", data, "--batch-size", 64, "--runtime", runtime]
    if limit:
        args += ["--limit", limit]
    runs = [wnconvert(args, capture_json=True) for _ in range(repeats)]
    assert len({r["top1"] for r in runs}) == 1, runs  # deterministic accuracy
    return runs[0] | {"images_per_s": max(r["images_per_s"] for r in runs),
                      "images_per_s_runs": [r["images_per_s"] for r in runs]}


def evaluate_all(path: Path, data: str, openvino: bool, limit: int | None = None) -> dict:
    """:func:`evaluate` in onnxruntime, with the OpenVINO evaluation under ``"openvino"``."""
    res = evaluate(path, data, limit)
    if openvino:
        res["openvino"] = evaluate(path, data, limit, runtime="openvino")
    return res


def speed_reference(runs: Path, device: str, openvino: bool) -> dict[str, dict]:
    """fp32 vs int8 vs int4 images/s of an untrained ResNet-50 at 224 px on synthetic images."""
    run = runs / "speed-resnet50"
    ensure(["finetune", "resnet50", "--weights", "none", "--num-classes", 10, "--epochs", 0,
            "--image-size", 224, "--samples", 2, "--device", device, "--out", run])
    wnconvert(["export", run, "--precision", "int8", "--data", "synthetic:10", "--calib-samples", 32])
    wnconvert(["export", run, "--precision", "int4"])
    res = {}
    for label, name in (("fp32", "model.onnx"), ("int8 W8A8", "model.int8.onnx"),
                        ("int4 weights", "model.int4.onnx")):
        res[label] = evaluate_all(run / name, "synthetic:10", openvino, limit=256)
    return res


def ratio(res: dict, label: str, runtime: str | None = None) -> float:
    """images/s of ``label`` over that of fp32, in onnxruntime or (``runtime``) OpenVINO."""
    pick = (lambda r: r[runtime]) if runtime else (lambda r: r)
    return pick(res[label])["images_per_s"] / pick(res["fp32"])["images_per_s"]


def tables(results: dict, speed: dict, openvino: bool) -> str:
    labels = ["fp32", "int8 W8A8", "int4 weights, per tensor", "int4 weights"]
    ov_head = " OpenVINO int8 vs fp32 | OpenVINO int4 vs fp32 |" if openvino else ""
    lines = ["| run | " + " | ".join(labels) + " | int8 speed vs fp32 | int4 speed vs fp32 |" + ov_head,
             "|" + "---|" * (len(labels) + 3 + 2 * openvino)]
    for name, res in results.items():
        cells = [f"{100 * res[k]['top1']:.2f}" if k in res else "–" for k in labels]
        ov = "".join(f" {ratio(res, k, 'openvino'):.2f}× |" for k in ("int8 W8A8", "int4 weights")) if openvino else ""
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {ratio(res, 'int8 W8A8'):.2f}× | {ratio(res, 'int4 weights'):.2f}× |" + ov)
    if speed:
        keys = ("fp32", "int8 W8A8", "int4 weights")
        lines += ["", "| ResNet-50, 224 px, speed only | fp32 | int8 W8A8 | int4 weights |", "|---|---|---|---|"]
        rows = [("images/s (ratio to fp32)", None)] + ([("OpenVINO images/s (ratio to its fp32)", "openvino")]
                                                       if openvino else [])
        for title, rt in rows:
            lines.append(f"| {title} | " + " | ".join(
                f"{(speed[k][rt] if rt else speed[k])['images_per_s']:.1f} ({ratio(speed, k, rt):.2f}×)"
                for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--no-speed-reference", action="store_true", help="skip the ResNet-50 224 px speed rows")
    ap.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO speed columns")
    ap.add_argument("--eval-limit", type=int, default=None,
                    help="evaluate on this many test images (default: all; for a quick smoke run)")
    args = ap.parse_args()
    recipe = start(args)
    todo = plan(recipe, args.eq_epochs, args.every)
    for cmd in todo.values():
        ensure(cmd)

    results: dict[str, dict] = {}
    for name in ["baseline", *todo]:
        run = args.runs / name
        made = files(run, args.data, baseline=(name == "baseline"))
        results[name] = {label: evaluate_all(path, args.data, not args.no_openvino, args.eval_limit)
                         for label, path in made.items()}
        report = json.loads((run / "report.json").read_text())
        for label, prec in (("int8 W8A8", "int8"), ("int4 weights", "int4")):
            results[name][label]["vs_fp32"] = report["quantized"][prec]["vs_fp32"]
            results[name][label]["lossless"] = report["quantized"][prec].get("lossless_check")
    speed = {} if args.no_speed_reference else speed_reference(args.runs, args.device, not args.no_openvino)
    md = tables(results, speed, not args.no_openvino)
    out = {"results": results, "speed_reference": speed,
           "commands": {"baseline": shown(recipe.baseline_args())} | {k: shown(v) for k, v in todo.items()}}
    (args.docs / "lowbit_study.json").write_text(json.dumps(out, indent=1) + "\n")
    (args.docs / "lowbit_table.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
