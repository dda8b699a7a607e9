"""Activation quantization, wnconvert vs peers: test top-1 and CPU speed of the deployed ONNX files of
(a) onnxruntime's post-training static quantization of the fp32 baseline (W8A8, W4A8), (b) Brevitas
QAT (W8A8, W4A8, W4A4) and (c) wnconvert ``--weight-bits/--act-bits`` fine-tunes (W8A8, W4A8, W4A4),
all on the same model, data, image size, epochs and seed (issue 10).

    .venv/bin/pip install -e '.[test,report,bench]'     # brevitas + onnxoptimizer: the bench extra
    .venv/bin/python benchmarks/peers.py --runs runs/peers --docs docs/figures

Files and how each is made (commands printed and recorded, runs reused: study_runs.ensure):

* baseline: ResNet-18 from scratch, ``--scheme none`` (study_runs.Recipe), ``--baseline-epochs`` on
  ``--baseline-limit-train`` training images; its ``model.onnx`` is the fp32 reference;
* PTQ (onnxruntime): ``wnconvert export baseline --precision int8 --data D --calib-samples 256``
  (W8A8) and ``--precision int4 --act-bits 8`` (W4A8): ``quant_pre_process`` + ``quantize_static``,
  QDQ, MinMax, per-channel weights, uint8 activations (convert/quantize/static.py);
* wnconvert: ``finetune --scheme channel-max --weight-bits B --act-bits A`` of the baseline, then
  ``export --precision int8|int4`` (trained scales) and ``verify`` (lossless-activations contract);
* Brevitas: the same fine-tune under Brevitas's stock quantizers (benchmarks/peers_brevitas.py),
  trained by wnconvert's training loop with the wnconvert run's settings, exported as QCDQ ONNX.

Accuracy: top-1 on the whole test split (``--eval-limit`` for a smoke test) by the function behind
``wnconvert eval FILE --data D``, in-process; speed: its images/s over ``--speed-limit`` images, the
best of ``--repeats`` interleaved rounds, as a ratio to the baseline's fp32 file. Defaults are the
2-core CPU budget of docs/results.md; ``--measure-only`` trains nothing and tables what is made.
Smoke test: ``--runs runs/peers-smoke --baseline-limit-train 512 --limit-train 512 --eval-limit 512``.
Issue 23: ``--recipe sgd`` (SGD lr 1e-3, momentum 0.9, cosine, label smoothing 0.1 for wnconvert and
Brevitas alike; default ``adamw``: the CLI's fine-tuning defaults), ``--learned`` (also the wnconvert
runs with ``--weight-range learned``), ``--cells W4A8,W4A4`` (a subset of the configurations) and
``--no-speed`` (accuracy only).
The studies' budget (docs/results.md): ``--runs runs/study --baseline-epochs 8 --baseline-limit-train 0
--baseline-limit-val 0 --epochs 2 --limit-train 0 --limit-val 0 --batch-size 128`` (0: every image; the
baseline is then study_runs' own and shared with dynamics_study.py and lowbit_study.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from study_runs import CLI, ENV, Recipe, ensure, made, shown, wnconvert

from wnconvert.convert.artifacts import sha256, write_text
from wnconvert.models.run.accuracy import artifact_accuracy
from wnconvert.models.run.rundir import RunDir
from wnconvert.models.train.train_config import TrainConfig

# label, weight bits, activation bits, wnconvert export precision
CONFIGS = (("W8A8", 8, 8, "int8"), ("W4A8", 4, 8, "int4"), ("W4A4", 4, 4, "int4"))
PTQ = (("W8A8", "int8"), ("W4A8", "int4"))
SCHEME = "channel-max"  # per-channel weight scales, like Brevitas's Int8WeightPerChannelFloat
# The fine-tunes' optimizer recipes (issue 23): finetune options and the TrainConfig they resolve to.
RECIPES = {"adamw": ([], {}),
           "sgd": (["--optimizer", "sgd", "--lr", "0.001", "--label-smoothing", "0.1"],
                   {"optimizer": "sgd", "lr": 0.001, "label_smoothing": 0.1})}


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/peers"), help="run directories (reused)")
    ap.add_argument("--docs", type=Path, default=Path("docs/figures"), help="where peers.json goes")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--baseline-epochs", type=int, default=2)
    ap.add_argument("--baseline-limit-train", type=int, default=16000, help="baseline training images (0: all)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of every QAT fine-tune")
    ap.add_argument("--limit-train", type=int, default=1024, help="training images of every QAT fine-tune (0: all)")
    ap.add_argument("--batch-size", type=int, default=32, help="batch size of every QAT fine-tune")
    ap.add_argument("--baseline-limit-val", type=int, default=2000, help="validation images of the baseline's epochs "
                                                                         "(0: all)")
    ap.add_argument("--limit-val", type=int, default=500, help="validation images of the fine-tunes' epochs (0: all)")
    ap.add_argument("--calib-samples", type=int, default=256, help="PTQ calibration images")
    ap.add_argument("--eval-limit", type=int, default=None, help="test images per eval (default: all)")
    ap.add_argument("--eval-limit-4bit", type=int, default=None,
                    help="test images per eval of the 4-bit files (default: --eval-limit); for a short budget")
    ap.add_argument("--speed-limit", type=int, default=1000, help="test images per speed evaluation")
    ap.add_argument("--repeats", type=int, default=3, help="speed: best of N interleaved rounds")
    ap.add_argument("--recipe", choices=tuple(RECIPES), default="adamw", help="the fine-tunes' optimizer recipe")
    ap.add_argument("--learned", action="store_true", help="also wnconvert with --weight-range learned")
    ap.add_argument("--cells", default=",".join(c[0] for c in CONFIGS), help="configurations to make, e.g. W4A8,W4A4")
    ap.add_argument("--no-speed", action="store_true", help="accuracy only: no speed rounds")
    ap.add_argument("--only", choices=("all", "wn", "learned", "brevitas"), default="all",
                    help="make only these runs (several invocations side by side; then one --measure-only for the "
                         "table)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="use this complete run as the baseline (its command.txt is recorded) instead of making one")
    ap.add_argument("--measure-only", action="store_true",
                    help="train nothing: measure the runs already made, leave the others out of the table")
    a = ap.parse_args()
    for name in ("baseline_limit_train", "baseline_limit_val", "limit_train", "limit_val"):
        setattr(a, name, getattr(a, name) or None)  # 0: every image, as when the option is not given
    return a


def baseline_command(a: argparse.Namespace, baseline: Path) -> str:
    """The command that made the baseline: the recipe's, or a given run's command.txt."""
    if a.baseline is None:
        return shown(baseline_args(a))
    done = baseline / "command.txt"
    return done.read_text().strip() if done.exists() else f"(given run {baseline})"


def limit(option: str, n: int | None) -> list:
    """``[option, n]``, or nothing when ``n`` is None (every image)."""
    return [option, n] if n else []


def require_bench_extra() -> None:
    """One line and exit 2 when the bench extra is missing, before anything is trained."""
    missing = [m for m in ("brevitas", "onnxoptimizer") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"peers.py needs {' and '.join(missing)}: .venv/bin/pip install -e '.[test,report,bench]'",
              file=sys.stderr)
        raise SystemExit(2)


def baseline_args(a: argparse.Namespace) -> list[str]:
    """study_runs' baseline recipe on ``--baseline-limit-train`` images (validated on
    ``--baseline-limit-val``)."""
    recipe = Recipe(a.runs, a.data, a.device, a.baseline_epochs, a.epochs, limit("--limit-val", a.baseline_limit_val))
    args = recipe.baseline_args()
    args[-2:-2] = limit("--limit-train", a.baseline_limit_train)
    return args


def verified(run: Path, precision: str) -> dict:
    """``wnconvert verify RUN --precision P`` under the lossless-activations contract: its exit code
    and what report.json records (a failure is recorded, not raised: it is a finding of the study)."""
    args = ["verify", str(run), "--precision", precision]
    print("$ " + shown(args), flush=True)
    proc = subprocess.run(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    res = json.loads((run / "report.json").read_text()).get("verify", {}).get("quantized", {}).get(precision, {})
    return summary_of(res, proc.returncode, proc.stderr.strip()[-500:])


def summary_of(res: dict, exit_code: int, stderr: str) -> dict:
    return {"exit": exit_code, "stderr": stderr, "contract": res.get("contract"), "passed": res.get("passed"),
            "failures": res.get("failures"), "inputs": res.get("inputs"),
            "ties": {level: sum(counts.values()) for level, counts in res.get("ties", {}).items()}}


def cells(a: argparse.Namespace) -> list[tuple]:
    wanted = a.cells.split(",")
    return [c for c in CONFIGS if c[0] in wanted]


def suffix(a: argparse.Namespace) -> str:
    """Run-name suffix of the recipe: none for adamw (the runs of the earlier study)."""
    return "" if a.recipe == "adamw" else f"-{a.recipe}"


def wnconvert_files(recipe: Recipe, a: argparse.Namespace, learned: bool = False) -> dict[str, dict]:
    out = {}
    for label, w, act, precision in cells(a):
        name = f"wn-{label.lower()}{suffix(a)}" + ("-learned" if learned else "")
        args = recipe.finetune_args(name, SCHEME, "--weight-bits", w, "--act-bits", act,
                                    *(["--weight-range", "learned"] if learned else []), *RECIPES[a.recipe][0],
                                    *limit("--limit-train", a.limit_train), "--batch-size", a.batch_size)
        if a.measure_only and not made(args):
            print(f"# --measure-only: {name} is not made, left out", flush=True)
            continue
        run = ensure(args)
        export = ["export", run, "--precision", precision] + (["--act-bits", act] if precision == "int4" else [])
        check = previous_check(run, precision)
        if check is None:
            wnconvert(export)
            check = verified(run, precision)
        out[label] = {"run": run, "file": run / f"model.{precision}.onnx", "fp32": run / "model.onnx",
                      "command": shown(args), "export": shown(export), "verify": check}
    return out


def previous_check(run: Path, precision: str) -> dict | None:
    """The verify summary of an earlier invocation when the run still holds its file unchanged
    (exit 0 and a passed contract only: anything else is exported and checked again)."""
    if not (run / f"model.{precision}.onnx").exists():
        return None
    try:
        RunDir(run).check_artifacts(RunDir(run).manifest())
    except Exception:  # a changed or missing artifact: export again
        return None
    res = json.loads((run / "report.json").read_text()).get("verify", {}).get("quantized", {}).get(precision)
    if not res or not res.get("passed"):
        return None
    print(f"# reusing {run / f'model.{precision}.onnx'} (verified)", flush=True)
    return summary_of(res, 0, "")


def ptq_files(baseline: Path, a: argparse.Namespace) -> dict[str, dict]:
    out = {}
    for label, precision in [p for p in PTQ if p[0] in a.cells.split(",")]:
        export = ["export", baseline, "--precision", precision, "--act-bits", 8, "--data", a.data,
                  "--calib-samples", a.calib_samples]
        report = json.loads((baseline / "report.json").read_text()).get("quantized", {}).get(precision, {})
        if not ((baseline / f"model.{precision}.onnx").exists() and report.get("activations") == "uint8"
                and report.get("calibration") == f"{a.calib_samples} train images from {a.data}"):
            wnconvert(export)
        out[label] = {"file": baseline / f"model.{precision}.onnx", "export": shown(export)}
    return out


def brevitas_files(baseline: Path, a: argparse.Namespace) -> dict[str, dict]:
    """The Brevitas fine-tunes, trained with the settings ``finetune`` resolves the wnconvert runs'
    options to (checked against their manifests by :func:`same_training`)."""
    import peers_brevitas  # imports brevitas: only after require_bench_extra()

    cfg = peer_train_config(a)
    out = {}
    for label, w, act, _ in cells(a):
        path = peers_brevitas.brevitas_run(baseline, a.runs / f"brevitas-{label.lower()}{suffix(a)}", w, act, cfg,
                                           a.limit_train, a.limit_val, train_missing=not a.measure_only)
        if path is None:
            print(f"# --measure-only: Brevitas {label} is not made, left out", flush=True)
            continue
        out[label] = {"file": path, "train": cfg.to_dict()}
    return out


def peer_train_config(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=a.epochs, batch_size=a.batch_size, device=a.device, seed=0, **RECIPES[a.recipe][1])


def same_training(wn: dict[str, dict], a: argparse.Namespace) -> None:
    """Brevitas trained exactly as the wnconvert runs did, or the comparison is void."""
    cfg = peer_train_config(a)
    for label, row in wn.items():
        m = RunDir(row["run"]).manifest()
        if m.train.to_dict() != cfg.to_dict() or (m.limit_train, m.limit_val) != (a.limit_train, a.limit_val):
            raise SystemExit(f"{row['run']} trained with other settings than the Brevitas runs: "
                             f"{m.train.to_dict()} vs {cfg.to_dict()}")


def measure(path: Path, a: argparse.Namespace, limit: int | None = None) -> dict:
    """Top-1 on the test split (``limit`` images, default ``--eval-limit``: all). In-process calls
    of the function behind ``wnconvert eval`` (same session, preprocessing and loop): on this loaded
    machine each ``wnconvert eval`` process spent about a minute starting up. Kept in
    RUNS/measurements.json, keyed by the file's sha256, so an interrupted study measures only what
    is new."""
    limit = limit or a.eval_limit
    key = json.dumps([str(path), sha256(path), a.data, limit])
    cache_path = a.runs / "measurements.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if key not in cache:
        print(f"# wnconvert eval {path} --data {a.data}" + (f" --limit {limit}" if limit else ""), flush=True)
        res = artifact_accuracy(path, a.data, limit=limit)
        entry = {"file": str(path), "top1": res["top1"], "images": res["images"]}
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}  # others may have written
        cache[key] = entry
        write_text(cache_path, json.dumps(cache, indent=1) + "\n")
    return cache[key]


def speeds(files: dict[str, Path], a: argparse.Namespace) -> dict[str, dict]:
    """images/s of each file over ``--speed-limit`` test images, the best of ``--repeats`` rounds
    that visit every file in turn: the machine's load drifts, and interleaving keeps the ratios
    between files measured under the same load."""
    runs: dict[str, list[float]] = {name: [] for name in files}
    for _ in range(a.repeats):
        for name, path in files.items():
            runs[name].append(artifact_accuracy(path, a.data, limit=a.speed_limit)["images_per_s"])
    return {name: {"images_per_s": max(r), "images_per_s_runs": r} for name, r in runs.items()}


def targets(ptq: dict, brev: dict, wn: dict) -> dict[str, dict]:
    """The issue's targets, each with the two numbers it was judged on (top-1 in %, speed as a
    ratio); ``met`` is None where a row was not made (--measure-only)."""
    def top1(rows: dict, label: str, key: str = "top1") -> float | None:
        return 100 * rows[label][key] if label in rows else None

    speed = wn["W8A8"].get("speed_vs_fp32") if "W8A8" in wn else None
    checks: dict = {  # name: (value, reference, margin): met when value >= reference + margin
        "W8A8 within 0.3 of its run's fp32": (top1(wn, "W8A8"), top1(wn, "W8A8", "fp32_top1"), -0.3),
        "W8A8 >= PTQ W8A8": (top1(wn, "W8A8"), top1(ptq, "W8A8"), 0.0),
        "W4A8 >= PTQ W4A8 + 1": (top1(wn, "W4A8"), top1(ptq, "W4A8"), 1.0),
        "W4A8 >= Brevitas W4A8": (top1(wn, "W4A8"), top1(brev, "W4A8"), 0.0),
        "W4A4 within 1.5 of its run's fp32": (top1(wn, "W4A4"), top1(wn, "W4A4", "fp32_top1"), -1.5),
        "W4A4 >= Brevitas W4A4": (top1(wn, "W4A4"), top1(brev, "W4A4"), 0.0),
        "W8A8 >= 1.5x fp32 images/s": (speed, 1.5, 0.0),
    }
    return {k: {"met": None if v is None or r is None else bool(v >= r + m - 1e-9),
                "value": v, "reference": r} for k, (v, r, m) in checks.items()}


def table(fp32: dict, groups: dict[str, dict[str, dict]]) -> str:
    lines = ["| method | W/A | test top-1 (%) | vs fp32 (points) | images/s | × fp32 |", "|---|---|---|---|---|---|",
             f"| fp32 baseline | 32/32 | {100 * fp32['top1']:.2f} | – | {fp32['images_per_s']:.0f} | 1.00× |"]
    for method, rows in groups.items():
        for label, r in rows.items():
            lines.append(f"| {method} | {label} | {100 * r['top1']:.2f} | {100 * (r['top1'] - fp32['top1']):+.2f} | "
                         f"{r['images_per_s']:.0f} | {r['speed_vs_fp32']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    a = arguments()
    require_bench_extra()
    recipe = Recipe(a.runs, a.data, a.device, a.baseline_epochs, a.epochs, limit("--limit-val", a.limit_val))
    a.docs.mkdir(parents=True, exist_ok=True)
    baseline = a.baseline or ensure(baseline_args(a))
    if a.only != "all":  # make and measure these runs; the table comes from a later --measure-only
        rows = {"wn": lambda: wnconvert_files(recipe, a), "learned": lambda: wnconvert_files(recipe, a, learned=True),
                "brevitas": lambda: brevitas_files(baseline, a)}[a.only]()
        for row in rows.values():
            for key in ("file", "fp32"):
                if key in row:
                    measure(Path(row[key]), a)
        return
    with ThreadPoolExecutor(1) as pool:  # wnconvert's fine-tunes (subprocesses) beside Brevitas's
        wn_runs = pool.submit(wnconvert_files, recipe, a)
        brev = brevitas_files(baseline, a)  # in this (main) thread: the training loop sets signal handlers
        wn = wn_runs.result()
    same_training(wn, a)
    learned = wnconvert_files(recipe, a, learned=True) if a.learned else {}
    same_training(learned, a)
    ptq = ptq_files(baseline, a)
    write_results(a, baseline, wn, ptq, brev, learned)


def write_results(a: argparse.Namespace, baseline: Path, wn: dict, ptq: dict, brev: dict,
                  learned: dict | None = None) -> None:
    """Measure every file, write ``peers.json`` under ``--docs`` and print the table and targets."""
    fp32 = measure(baseline / "model.onnx", a)
    for label, row in (wn | {f"{k} learned": v for k, v in (learned or {}).items()}).items():  # the run's float network
        row["fp32_top1"] = measure(row.pop("fp32"), a, a.eval_limit_4bit if label != "W8A8" else None)["top1"]
    groups = {"onnxruntime PTQ": ptq, "Brevitas QAT": brev, "wnconvert QAT": wn}
    if learned:
        groups["wnconvert QAT, learned range"] = learned
    for rows in groups.values():
        for label, row in rows.items():
            row |= measure(row.pop("file"), a, a.eval_limit_4bit if label != "W8A8" else None)
            row.pop("run", None)
    if a.no_speed:
        return write_accuracy(a, baseline, fp32, groups, wn, ptq, brev, learned or {})
    speed = speeds({"fp32": baseline / "model.onnx"} | {f"{m}/{label}": Path(r["file"])
                                                         for m, rows in groups.items() for label, r in rows.items()}, a)
    fp32 |= speed["fp32"]
    for method, rows in groups.items():
        for label, row in rows.items():
            row |= speed[f"{method}/{label}"]
            row["speed_vs_fp32"] = row["images_per_s"] / fp32["images_per_s"]
    md = table(fp32, groups)
    out = {"budget": vars(a) | {"runs": str(a.runs), "docs": str(a.docs)},
           "baseline": {"command": baseline_command(a, baseline), "fp32": fp32},
           **{k: v for k, v in zip(("ptq", "brevitas", "wnconvert"), groups.values())},
           "targets": targets(ptq, brev, wn), "table": md}
    (a.docs / "peers.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(md)
    for name, t in out["targets"].items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"{verdict}: {name} ({t['value']} vs {t['reference']})")


def write_accuracy(a, baseline: Path, fp32: dict, groups: dict, wn: dict, ptq: dict, brev: dict,
                   learned: dict) -> None:
    """``--no-speed``: the top-1 table and the targets, into ``peers-RECIPE.json`` under ``--docs``."""
    lines = ["| method | W/A | test top-1 (%) | vs fp32 (points) |", "|---|---|---|---|",
             f"| fp32 baseline | 32/32 | {100 * fp32['top1']:.2f} | – |"]
    for method, rows in groups.items():
        for label, r in rows.items():
            lines.append(f"| {method} | {label} | {100 * r['top1']:.2f} | {100 * (r['top1'] - fp32['top1']):+.2f} |")
    md = "\n".join(lines)
    checks = targets(ptq, brev, wn) | {f"learned {k}": v for k, v in targets(ptq, brev, learned).items()}
    out = {"budget": vars(a) | {"runs": str(a.runs), "docs": str(a.docs)},
           "baseline": {"command": baseline_command(a, baseline), "fp32": fp32},
           **{k: v for k, v in zip(("ptq", "brevitas", "wnconvert"), (ptq, brev, wn))}, "wnconvert_learned": learned,
           "targets": {k: v for k, v in checks.items() if "images/s" not in k}, "table": md}
    (a.docs / f"peers-{a.recipe}.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(md)
    for name, t in out["targets"].items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"{verdict}: {name} ({t['value']} vs {t['reference']})")


if __name__ == "__main__":
    main()
