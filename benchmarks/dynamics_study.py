"""Training dynamics of reparametrized ResNet-18 on Fashion-MNIST, made with wnconvert's commands.

    python benchmarks/dynamics_study.py --runs runs/study --docs docs/figures

1. the baseline: ResNet-18 from scratch without reparametrization (study_runs.Recipe);
2. fine-tunes of it with ``--diagnostics 10`` (dynamics.jsonl; ``--every``):
   * at each optimizer's defaults (cosine schedule): layer-max and channel-max under sgd, adamw,
     lars: which scheme, which optimizer;
   * in an *equilibrium regime* (sgd, momentum 0.9, lr 0.05, weight decay 5e-3, constant
     schedule), where ``||W||`` relaxes with time constant (1 − m) / (2 lr λ) = 200 steps:
     ``--wd-mode l2 | eps-shifted | none``. The default fine-tune (lr 0.01, λ 1e-4) has a time
     constant of 50 000 steps, far beyond any fine-tune, which is why its ratios stay where the
     pretrained norms put them;
   * from scratch under layer-max (the setting of ``make demo``, one epoch): sgd vs adamw at their
     from-scratch defaults;
3. ``wnconvert report`` of the l2 equilibrium run;
4. figures (PNG) and a summary (JSON + a markdown table) in ``--docs``.

Equilibrium check: per layer, the median of ``(||W||/||g||) / sqrt(lr / (2 λ (1 − m)))`` over the
records of the last epoch; a layer has settled when that median is within 25 % of 1.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from study_runs import Recipe, ensure, parser, read_jsonl, shown, start, summary, wnconvert

EQ = ("--optimizer", "sgd", "--lr", "0.05", "--weight-decay", "5e-3", "--momentum", "0.9",
      "--schedule", "constant")
TOLERANCE = 0.25


def runs(recipe: Recipe, eq_epochs: int, every: int = 10) -> dict[str, list[str]]:
    """name -> wnconvert arguments. Every run logs diagnostics every ``every`` steps."""
    d = ("--diagnostics", str(every))
    plan = {}
    for scheme, short in (("layer-max", "lm"), ("channel-max", "cm")):
        for opt in ("sgd", "adamw", "lars"):
            plan[f"{short}-{opt}"] = recipe.finetune_args(f"{short}-{opt}", scheme, "--optimizer", opt, *d)
    for mode in ("l2", "eps-shifted", "none"):
        name = f"lm-sgd-eq-{mode}"
        plan[name] = recipe.finetune_args(name, "layer-max", *EQ, "--wd-mode", mode,
                                          "--epochs", eq_epochs, *d)
    for opt in ("sgd", "adamw"):  # from scratch under layer-max, as in `make demo`
        name = f"scratch-lm-{opt}"
        plan[name] = ["finetune", "resnet18", "--data", recipe.data, "--weights", "none",
                      "--scheme", "layer-max", "--epochs", 1, "--limit-val", 2000,
                      "--device", recipe.device, "--seed", 0, *recipe.extra, "--optimizer", opt,
                      *d, "--out", recipe.runs / name]
    return plan


# -- reading dynamics.jsonl ----------------------------------------------------------------------

def per_step(dyn: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Median over layers of ``key`` at each logged step."""
    steps, values = [], []
    for rec in dyn:
        vals = [v[key] for v in rec["layers"].values() if v.get(key) is not None]
        if vals:
            steps.append(rec["step"])
            values.append(statistics.median(vals))
    return steps, values


def relative_norms(dyn: list[dict]) -> tuple[list[int], list[float]]:
    """Median over layers of ``||W|| / ||W||`` at the first record."""
    first = dyn[0]["layers"]
    steps, values = [], []
    for rec in dyn:
        vals = [v["w_norm"] / first[k]["w_norm"] for k, v in rec["layers"].items()
                if v.get("w_norm") and first.get(k, {}).get("w_norm")]
        steps.append(rec["step"])
        values.append(statistics.median(vals))
    return steps, values


def equilibrium_ratios(dyn: list[dict], last_epoch: int) -> dict[str, float]:
    """Per layer: median over the last epoch's records of (||W||/||g||) / equilibrium."""
    acc: dict[str, list[float]] = {}
    for rec in dyn:
        if rec["epoch"] != last_epoch:
            continue
        for name, v in rec["layers"].items():
            if v.get("w_over_g") and v.get("equilibrium"):
                acc.setdefault(name, []).append(v["w_over_g"] / v["equilibrium"])
    return {k: statistics.median(v) for k, v in acc.items()}


def ratio_series(dyn: list[dict], window: int = 9) -> dict[str, tuple[list[int], list[float]]]:
    """Per layer, (||W||/||g||)/equilibrium per record, as a running median over ``window``."""
    raw: dict[str, tuple[list[int], list[float]]] = {}
    for rec in dyn:
        for name, v in rec["layers"].items():
            if v.get("w_over_g") and v.get("equilibrium"):
                s, y = raw.setdefault(name, ([], []))
                s.append(rec["step"])
                y.append(v["w_over_g"] / v["equilibrium"])
    out = {}
    for name, (s, y) in raw.items():
        sm = [statistics.median(y[max(0, i - window // 2): i + window // 2 + 1]) for i in range(len(y))]
        out[name] = (s, sm)
    return out


# -- figures -------------------------------------------------------------------------------------

def figures(dyn: dict[str, list[dict]], docs: Path, recipe: Recipe) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, path: Path) -> None:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    made = {}
    budget = f"ResNet-18, Fashion-MNIST, {recipe.device}"

    # 1. ||W||/||g|| against its equilibrium: the l2 equilibrium run, and the default sgd run
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, name, title in ((axes[0], "lm-sgd-eq-l2", "sgd lr 0.05, wd 5e-3, constant"),
                            (axes[1], "lm-sgd", "sgd defaults lr 0.01, wd 1e-4, cosine")):
        for layer, (s, y) in ratio_series(dyn[name]).items():
            ax.plot(s, y, lw=0.8, alpha=0.6)
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.axhspan(1 - TOLERANCE, 1 + TOLERANCE, color="grey", alpha=0.15)
        ax.set_yscale("log")
        ax.set_title(f"layer-max, {title}", fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0].set_ylabel("(‖W‖/‖g‖) / sqrt(lr / (2 wd (1−m)))")
    fig.suptitle(f"‖W‖/‖g‖ over its predicted equilibrium, one line per layer ({budget})", fontsize=10)
    save(fig, docs / "dyn_equilibrium.png")
    made["dyn_equilibrium.png"] = "lm-sgd-eq-l2 and lm-sgd"

    norms = (relative_norms, "median over layers of ‖W‖ / ‖W‖ at start", False)
    angles = (lambda d: per_step(d, "angle"), "angle turned per step (rad), median of layers", True)

    def side_by_side(names: list[str], prefix: str, panels, legend: str, title: str, path: Path) -> None:
        """One panel per (series, ylabel, log y) in ``panels``, one line per run in each."""
        fig, axes = plt.subplots(1, len(panels), figsize=(11, 4))
        for ax, (series, ylabel, logy) in zip(axes, panels):
            for name in names:
                ax.plot(*series(dyn[name]), label=name.removeprefix(prefix))
            ax.set_ylabel(ylabel)
            ax.set_xlabel("optimizer step")
            ax.legend(title=legend, fontsize=8)
            if logy:
                ax.set_yscale("log")
        fig.suptitle(f"{title} ({budget})", fontsize=10)
        save(fig, path)
        made[path.name] = ", ".join(names)

    # 2. weight norms and the effective step in the equilibrium regime: l2 vs eps-shifted vs none
    eff_lr = (lambda d: per_step(d, "eff_lr"), "median over layers of lr / ‖W‖²", True)
    side_by_side(["lm-sgd-eq-l2", "lm-sgd-eq-eps-shifted", "lm-sgd-eq-none"], "lm-sgd-eq-",
                 [norms, eff_lr], "--wd-mode",
                 "sgd lr 0.05, constant, wd 5e-3: weight norm and effective learning rate",
                 docs / "dyn_wd_modes.png")

    # 3. angular update per step: the common currency of sgd, adamw and lars
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, short, scheme in ((axes[0], "lm", "layer-max"), (axes[1], "cm", "channel-max")):
        for opt in ("sgd", "adamw", "lars"):
            ax.plot(*per_step(dyn[f"{short}-{opt}"], "angle"), label=opt)
        ax.set_yscale("log")
        ax.set_title(scheme, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.legend(title="optimizer (defaults)", fontsize=8)
    axes[0].set_ylabel(angles[1])
    fig.suptitle(f"How far each step turns the weights, at each optimizer's defaults ({budget})", fontsize=10)
    save(fig, docs / "dyn_angles.png")
    made["dyn_angles.png"] = "lm-{sgd,adamw,lars}, cm-{sgd,adamw,lars}"

    # 4. from scratch: how far sgd and adamw turn freshly initialized, max-normalized weights
    side_by_side(["scratch-lm-sgd", "scratch-lm-adamw"], "scratch-lm-", [angles, norms],
                 "optimizer (from-scratch defaults)",
                 "ResNet-18 from scratch under layer-max, one epoch", docs / "dyn_scratch.png")

    # 5. the gradient at the max element, per layer: layer-max vs channel-max
    fig, ax = plt.subplots(figsize=(11, 4))
    names = list(dyn["lm-sgd"][0]["layers"])
    width = 0.4
    for i, name in enumerate(("lm-sgd", "cm-sgd")):
        med = [statistics.median([r["layers"][k]["grad_max_ratio"] for r in dyn[name]
                                  if r["layers"].get(k, {}).get("grad_max_ratio")] or [float("nan")])
               for k in names]
        ax.bar([j + (i - 0.5) * width for j in range(len(names))], med, width, label=name)
    ax.set_xticks(range(len(names)), [n.removesuffix(".weight") for n in names], rotation=60,
                  ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("|g| at argmax|W| / mean |g|\n(median over the run)")
    ax.legend(fontsize=8)
    ax.set_title(f"Gradient reaching the largest weight, per layer ({budget})", fontsize=10)
    save(fig, docs / "dyn_grad_at_max.png")
    made["dyn_grad_at_max.png"] = "lm-sgd, cm-sgd"
    return made


def table(rows: list[dict]) -> str:
    head = ("| run | scheme | optimizer | --wd-mode | schedule | top-1 (PyTorch) | top-1 (ONNX) | "
            "‖W‖ end/start | angle/step, last epoch | layers within 25 % of equilibrium |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        eq = "–" if r["settled"] is None else f"{r['settled']}/{r['layers']}"
        lines.append(f"| {r['run']} | {r['scheme']} | {r['optimizer']} | {r['wd_mode']} | {r['schedule']} | "
                     f"{100 * r['val_top1']:.2f} | {100 * r['onnx_top1']:.2f} | {r['norm_ratio']:.3f} | "
                     f"{r['angle']:.2e} | {eq} |")
    return "\n".join(lines)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    recipe = start(args)
    plan = runs(recipe, args.eq_epochs, args.every)
    for cmd in plan.values():
        ensure(cmd)
    eq_run = args.runs / "lm-sgd-eq-l2"
    wnconvert(["report", eq_run])
    shutil.copyfile(eq_run / "report" / "w_over_g.png", args.docs / "dyn_report_w_over_g.png")

    dyn = {name: read_jsonl(args.runs / name / "dynamics.jsonl") for name in plan}
    rows = []
    for name in plan:
        manifest = json.loads((args.runs / name / "manifest.json").read_text())
        train = manifest["train"]
        records = dyn[name]
        last_epoch = max(r["epoch"] for r in records)
        ratios = equilibrium_ratios(records, last_epoch)
        angles = [v for s, v in zip(*per_step([r for r in records if r["epoch"] == last_epoch], "angle"))]
        norms = relative_norms(records)[1]
        rows.append(summary(args.runs / name) | {
            "scheme": manifest["scheme"]["scheme"], "optimizer": train["optimizer"],
            "wd_mode": train["wd_mode"], "schedule": train.get("schedule", "cosine"),
            "lr": train["lr"], "weight_decay": train["weight_decay"],
            "norm_ratio": norms[-1], "angle": statistics.median(angles) if angles else float("nan"),
            "layers": len(records[0]["layers"]),
            "settled": (sum(abs(r - 1) <= TOLERANCE for r in ratios.values()) if ratios else None),
            "equilibrium_ratio_per_layer": ratios})
    made = figures(dyn, args.docs, recipe)
    base = summary(recipe.baseline)
    out = {"baseline": base, "runs": rows, "figures": made,
           "commands": {"baseline": shown(recipe.baseline_args())} | {k: shown(v) for k, v in plan.items()}}
    (args.docs / "dynamics_study.json").write_text(json.dumps(out, indent=1) + "\n")
    md = table(rows)
    (args.docs / "dynamics_table.md").write_text(md + "\n")
    print(f"baseline: top-1 {100 * base['val_top1']:.2f} (ONNX {100 * base['onnx_top1']:.2f})")
    print(md)


if __name__ == "__main__":
    main()
