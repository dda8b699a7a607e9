"""Power-of-two scales (``--scale-format po2``): what they cost in accuracy, and the integer
reference's time per image.

Runs, all by wnconvert's own commands (printed, reused when complete; see study_runs.py): the
shared ResNet-18 baseline (fp32, its ``model.onnx``), then four ``--act-bits 8`` fine-tunes of it
under channel-max: W8A8 with float scales, W8A8 po2, W4A8 float, W4A8 po2. Each fine-tune is
exported with its trained scales (``export --precision int8|int4``) and evaluated as the deployed
file in onnxruntime (``wnconvert eval FILE --data D``, test split); ``wnconvert golden`` then runs
the integer reference on ``--golden-count`` test images and reports whether the file is
integer-only and the reference's milliseconds per image.

    python benchmarks/po2_study.py --runs runs/po2 --baseline-epochs 2 --epochs 2 \\
        --extra "--limit-train 1000 --limit-val 500"
"""

from __future__ import annotations

import json
from pathlib import Path

from study_runs import ensure, parser, start, wnconvert

FINETUNES = {"w8a8-float": (8, "float"), "w8a8-po2": (8, "po2"), "w4a8-float": (4, "float"),
             "w4a8-po2": (4, "po2")}


def deployed(run: Path, wbits: int, data: str, golden_count: int) -> dict:
    """Export the trained integer network, evaluate it, run the integer reference on it."""
    precision = "int8" if wbits > 4 else "int4"
    wnconvert(["export", run, "--precision", precision])
    path = run / f"model.{precision}.onnx"
    acc = wnconvert(["eval", path, "--data", data, "--batch-size", 64], capture_json=True)
    gold = wnconvert(["golden", run, "--precision", precision, "--data", data, "--count", golden_count,
                      "--out", run / "golden"], capture_json=True)
    return {"file": str(path), "top1": acc["top1"], "images": acc.get("images"),
            "integer_only": gold["integer_only"], "reference_ms_per_image": gold["reference_ms_per_image"]}


def table(results: dict) -> str:
    lines = ["| model | test top-1 (deployed file, onnxruntime) | integer-only | integer reference ms/image |",
             "|---|---|---|---|"]
    for name, r in results.items():
        ms = f"{r['reference_ms_per_image']:.0f}" if r.get("reference_ms_per_image") else "–"
        only = {True: "yes", False: "no"}.get(r.get("integer_only"), "–")
        lines.append(f"| {name} | {100 * r['top1']:.2f} | {only} | {ms} |")
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--golden-count", type=int, default=16, help="test images the integer reference runs")
    args = ap.parse_args()
    recipe = start(args)
    fp32 = wnconvert(["eval", recipe.baseline / "model.onnx", "--data", args.data, "--batch-size", 64],
                     capture_json=True)
    results = {"fp32 (baseline)": {"file": str(recipe.baseline / "model.onnx"), "top1": fp32["top1"],
                                   "images": fp32.get("images")}}
    for name, (wbits, fmt) in FINETUNES.items():
        run = ensure(recipe.finetune_args(name, "channel-max", "--weight-bits", wbits, "--act-bits", 8,
                                          "--scale-format", fmt, "--no-export"))
        results[name] = deployed(run, wbits, args.data, args.golden_count)
    out = args.docs / "po2_study.json"
    out.write_text(json.dumps({"budget": vars(args) | {"runs": str(args.runs), "docs": str(args.docs)},
                               "results": results}, indent=2) + "\n")
    print(table(results))
    print(f"# written {out}")


if __name__ == "__main__":
    main()
