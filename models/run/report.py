"""``wnconvert report RUN_DIR``: figures and one self-contained HTML page for a run directory.

Reads ``metrics.jsonl``, ``dynamics.jsonl`` and ``initial_weights.json`` (both written with
``--diagnostics K``) and the run's checkpoint (via :func:`wnconvert.models.run.run.load_run`), folds it
with the run's fold settings and writes into ``RUN_DIR/report/``:

* ``loss.png``, ``accuracy.png``                  training/validation curves
* ``weight_norm.png``, ``eff_lr.png``             per-layer ``||W||`` and effective learning rate
* ``w_over_g.png``                                ``||W||/||g||`` against the SGD equilibrium line
* ``histograms.png``                              ``W/max|W|`` before / after fine-tuning, and the
                                                  stored weights after folding
* ``sqnr.png``                                    per-layer SQNR of the folded weights at 8 and 4 bits
* ``report.html``                                 all of the above, PNGs embedded as data: URIs
* ``summary.json``                                the per-layer numbers of the tables

Figures whose inputs are missing (no training, no diagnostics) are left out and the page says so.
matplotlib (``pip install wnconvert[report]``) is imported here only, with the Agg backend.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...convert import metrics
from ...convert.apply import raw_weight
from ...convert.artifacts import read_jsonl
from ...convert.errors import UserInputError
from ...convert.fold import FoldConfig, fold_model
from ...convert.scaled import stored_tensor
from ...convert.verify import VerifyConfig, make_inputs
from ...convert.weights import iter_weights
from ..files import METRICS, REPORT_DIR
from ..train.diagnostics import DYNAMICS, INITIAL, read_dynamics, unit_histogram  # noqa: F401
from .rundir import RunDir

SQNR_BITS = (8, 4)


@dataclass
class ReportResult:
    out: Path
    html: Path
    figures: list[Path] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)   # per-layer summary rows
    final: dict = field(default_factory=dict)          # last epoch record, if any
    notes: list[str] = field(default_factory=list)


def sqnr_db(w: torch.Tensor, bits: int) -> float:
    """SQNR in dB of ``w`` (stored, in [-1, 1]) on the symmetric ``bits``-bit grid over [-1, 1]."""
    x = w.detach().double().flatten()
    levels = 2 ** (bits - 1) - 1
    q = torch.round(x.clamp(-1, 1) * levels) / levels
    return metrics.sqnr_db(x.numpy(), q.numpy())


def _fig():
    from matplotlib.figure import Figure
    return Figure(figsize=(8, 4.5), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _layer_series(dyn: list[dict], key: str, group: str = "layers") -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for rec in dyn:
        for name, vals in rec.get(group, {}).items():
            v = vals.get(key)
            if v is None:
                continue
            steps, ys = out.setdefault(name, ([], []))
            steps.append(rec["step"])
            ys.append(v)
    return out


def _per_layer_plot(series: dict, title: str, ylabel: str, path: Path, logy: bool = True,
                    extra=None) -> Path:
    from matplotlib import colormaps
    fig = _fig()
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    n = max(1, len(series) - 1)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, ys, color=cmap(i / n), lw=1, label=name)
    if extra is not None:
        extra(ax)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) <= 24:
        ax.legend(fontsize=5, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def _folded_weights(model, manifest: dict, image_size: int) -> dict[str, torch.Tensor]:

    cfg = FoldConfig(**manifest["fold"])
    x = make_inputs((3, image_size, image_size), VerifyConfig(samples=2, seed=1234))
    result = fold_model(model, x, cfg)
    return {t.qualname: stored_tensor(m, t.tensor_name).detach()
            for t, m in iter_weights(result.model)}


def _raw_weights(model) -> dict[str, torch.Tensor]:
    return {t.qualname: raw_weight(m, t.tensor_name).detach() for t, m in iter_weights(model)}


def _sum_hists(hists: list[list[int]]) -> list[int]:
    return [sum(c) for c in zip(*hists)] if hists else []


def build_report(run_dir: Path) -> ReportResult:
    """Write ``RUN_DIR/report/`` (see the module docstring); returns what was written."""
    import matplotlib
    matplotlib.use("Agg", force=True)

    run_dir = Path(run_dir)
    loaded, model, pre = RunDir(run_dir).load()  # raises UserInputError for a non-run directory
    manifest = loaded.to_dict()
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    res = ReportResult(out=out, html=out / "report.html")
    metrics = read_jsonl(run_dir / METRICS)
    steps = [m for m in metrics if "step" in m]
    epochs = [m for m in metrics if "train_loss" in m]
    # After a resume the steps since the last checkpoint are logged again: keep the latest.
    dyn = sorted({r["step"]: r for r in read_dynamics(run_dir / DYNAMICS)}.values(),
                 key=lambda r: r["step"])
    initial = None
    if (run_dir / INITIAL).exists():
        initial = json.loads((run_dir / INITIAL).read_text(encoding="utf-8"))
    captions: dict[str, str] = {}

    _curves(res, captions, steps, epochs)
    _dynamics(res, captions, dyn)
    after = _raw_weights(model)
    try:
        folded = _folded_weights(model, manifest, pre.image_size)
    except Exception as err:  # the report should still show what it can
        folded = {}
        res.notes.append(f"fold failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    _histograms(res, captions, after, folded, initial, "after fine-tuning" if epochs else "checkpoint")
    _layers(res, captions, after, folded, dyn[-1]["layers"] if dyn else {})

    summary = {"run_dir": str(run_dir), "model": manifest.get("model"),
               "scheme": manifest.get("scheme"), "final": res.final, "layers": res.layers,
               "notes": res.notes}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    res.html.write_text(_html(manifest, res, captions), encoding="utf-8")
    return res


def _curves(res: ReportResult, captions: dict, steps: list[dict], epochs: list[dict]) -> None:
    """Loss and accuracy curves from metrics.jsonl."""
    out = res.out
    if steps or epochs:
        fig = _fig()
        ax = fig.add_subplot()
        if steps:
            ax.plot([m["step"] for m in steps], [m["loss"] for m in steps], lw=1, label="train (steps)")
        if epochs:
            per_epoch = max((m["step"] for m in steps), default=0) / max(len(epochs), 1) if steps else 1
            xs = [m["epoch"] * per_epoch for m in epochs]
            ax.plot(xs, [m["train_loss"] for m in epochs], "o-", label="train (epoch mean)")
            ax.plot(xs, [m["val_loss"] for m in epochs], "s-", label="validation")
        ax.set_xlabel("step" if steps else "epoch")
        ax.set_ylabel("cross entropy")
        ax.set_title("Loss")
        ax.legend()
        res.figures.append(_save(fig, out / "loss.png"))
        captions["loss.png"] = "Training loss per logged step and per epoch; validation loss per epoch."
    if epochs:
        fig = _fig()
        ax = fig.add_subplot()
        xs = [m["epoch"] for m in epochs]
        ax.plot(xs, [100 * m["val_top1"] for m in epochs], "o-", label="top-1")
        ax.plot(xs, [100 * m["val_top5"] for m in epochs], "s-", label="top-5")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title("Accuracy")
        ax.legend()
        res.figures.append(_save(fig, out / "accuracy.png"))
        captions["accuracy.png"] = "Validation accuracy per epoch."
        res.final = epochs[-1]
    else:
        res.notes.append("no epoch records in metrics.jsonl (the run did not train)")


def _dynamics(res: ReportResult, captions: dict, dyn: list[dict]) -> None:
    """Per-layer ||W||, effective learning rate and ||W||/||g|| from dynamics.jsonl."""
    out = res.out
    if dyn:
        res.figures.append(_per_layer_plot(_layer_series(dyn, "w_norm"), "Raw weight norm ||W||",
                                           "||W||", out / "weight_norm.png"))
        captions["weight_norm.png"] = ("Norm of each layer's raw tensor W. Gradients of a "
                                       "scale-invariant layer are orthogonal to W, so steps grow "
                                       "||W||; weight decay pulls it back.")
        res.figures.append(_per_layer_plot(_layer_series(dyn, "eff_lr"), "Effective learning rate",
                                           "eff. lr", out / "eff_lr.png"))
        captions["eff_lr.png"] = ("sgd: lr/||W||^2; lars: lr·trust/||W||^2; adamw: "
                                  "lr·sqrt(n)/||W|| (see models/train/diagnostics.py).")
        eq = [(r["step"], v["equilibrium"]) for r in dyn for v in list(r["layers"].values())[:1]
              if v.get("equilibrium") is not None]

        def eq_line(ax):
            if eq:
                ax.plot([s for s, _ in eq], [v for _, v in eq], "k--", lw=2,
                        label="sqrt(lr / (2 wd (1-momentum)))")

        res.figures.append(_per_layer_plot(_layer_series(dyn, "w_over_g"), "||W|| / ||g||",
                                           "||W|| / ||g||", out / "w_over_g.png", extra=eq_line))
        captions["w_over_g.png"] = ("||W||/||g|| per layer; the dashed line is the equilibrium "
                                    "value SGD with momentum and decay drives it to (sgd runs only)."
                                    if eq else "||W||/||g|| per layer (no equilibrium line: "
                                    "not an sgd run with decay).")
        _activations(res, captions, dyn)
    else:
        res.notes.append("no dynamics.jsonl: train with --diagnostics K for per-layer dynamics")


ACT_PLOTS = (("scale", "Activation scale", True), ("clipped", "Activations clipped (fraction)", False),
             ("sqnr_db", "Activation SQNR (dB)", False))


def _activations(res: ReportResult, captions: dict, dyn: list[dict]) -> None:
    """Per activation quantizer of an --act-bits run: scale, fraction clipped, SQNR over training."""
    if not any("activations" in r for r in dyn):
        return
    for key, title, logy in ACT_PLOTS:
        name = f"act_{key}.png"
        res.figures.append(_per_layer_plot(_layer_series(dyn, key, "activations"), title, key,
                                           res.out / name, logy=logy))
        captions[name] = f"{title} per activation quantizer, on the step's training batch in eval mode."


def _histograms(res: ReportResult, captions: dict, after: dict, folded: dict, initial: dict | None,
                after_label: str) -> None:
    """Weight histograms before and after fine-tuning, and of the folded model's stored values."""
    out = res.out
    bins = initial["bins"] if initial else 64
    hists = {after_label: _sum_hists([unit_histogram(w, bins) for w in after.values()])}
    if initial:
        hists = {"before fine-tuning": _sum_hists(list(initial["layers"].values())), **hists}
    else:
        res.notes.append("no initial_weights.json: the 'before' histogram needs --diagnostics")
    if folded:
        hists["after folding (stored)"] = _sum_hists(
            [torch.histc(w.float().flatten().clamp(-1, 1), bins=bins, min=-1, max=1)
             .to(torch.int64).tolist() for w in folded.values()])
    fig = _fig()
    ax = fig.add_subplot()
    centers = [-1 + (i + 0.5) * 2 / bins for i in range(bins)]
    for label, counts in hists.items():
        total = max(sum(counts), 1)
        ax.step(centers, [c / total for c in counts], where="mid", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("W / max|W| (per tensor); stored value after folding")
    ax.set_ylabel("fraction of weights")
    ax.set_title("Weight histograms (all conv/linear layers)")
    ax.legend()
    res.figures.append(_save(fig, out / "histograms.png"))
    captions["histograms.png"] = ("Distribution of every conv/linear weight divided by its "
                                  "tensor's max |W|, before and after fine-tuning, and the values "
                                  "the folded model stores.")


def _layers(res: ReportResult, captions: dict, after: dict, folded: dict, last: dict) -> None:
    """The per-layer rows of the summary, and the SQNR of the folded weights at 8 and 4 bits."""
    out = res.out
    for name, w in after.items():
        row: dict[str, Any] = {"layer": name, "numel": int(w.numel()),
                               "w_norm": float(torch.linalg.vector_norm(w.float())),
                               "w_max": float(w.abs().max())}
        for k in ("w_over_g", "equilibrium", "eff_lr", "angle", "grad_max_ratio", "frac_at_unit",
                  "grid_changed"):
            if last.get(name, {}).get(k) is not None:
                row[k] = last[name][k]
        if name in folded:
            for b in SQNR_BITS:
                row[f"sqnr{b}"] = sqnr_db(folded[name], b)
        res.layers.append(row)
    if folded:
        fig = _fig()
        ax = fig.add_subplot()
        names = [r["layer"] for r in res.layers if "sqnr8" in r]
        idx = list(range(len(names)))
        width = 0.4
        for j, b in enumerate(SQNR_BITS):
            vals = [min(r[f"sqnr{b}"], 200.0) for r in res.layers if "sqnr8" in r]
            ax.bar([i + (j - 0.5) * width for i in idx], vals, width, label=f"{b} bits")
        ax.set_xticks(idx, names, rotation=90, fontsize=5)
        ax.set_ylabel("SQNR (dB)")
        ax.set_title("Quantization error of the folded weights (symmetric grid on [-1, 1])")
        ax.legend()
        res.figures.append(_save(fig, out / "sqnr.png"))
        captions["sqnr.png"] = ("10·log10(||w||² / ||w − q(w)||²) of each stored tensor on the "
                                "symmetric 8- and 4-bit grids over [-1, 1].")


def _json_default(x: Any) -> Any:
    return str(x)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return f"{v:.4g}"
    return html.escape(str(v))


def _html(manifest: dict, res: ReportResult, captions: dict[str, str]) -> str:
    e = html.escape
    scheme = manifest.get("scheme", {})
    train = manifest.get("train") or {}
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>wnconvert report: {e(str(manifest.get('model')))}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;"
        "text-align:right}th{background:#eee}td:first-child{text-align:left}"
        "img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}</style></head><body>",
        f"<h1>{e(str(manifest.get('model')))} — {e(str(scheme.get('scheme')))}</h1>",
        "<table>",
    ]
    info = {"scheme": scheme, "optimizer": train.get("optimizer"), "lr": train.get("lr"),
            "weight decay": train.get("weight_decay"), "wd mode": train.get("wd_mode"),
            "momentum": train.get("momentum"), "epochs": train.get("epochs"),
            "data": manifest.get("data")}
    for k, v in info.items():
        parts.append(f"<tr><td>{e(k)}</td><td style='text-align:left'>{e(json.dumps(v))}</td></tr>")
    if res.final:
        parts.append(f"<tr><td>final val top-1</td><td style='text-align:left'>"
                     f"{100 * res.final['val_top1']:.2f}%</td></tr>")
    parts.append("</table>")
    for note in res.notes:
        parts.append(f"<p><em>{e(note)}</em></p>")
    for path in res.figures:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{e(path.stem)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{e(captions.get(path.name, ''))}</figcaption></figure>")
    cols = ["layer", "numel", "w_norm", "w_max", "w_over_g", "equilibrium", "eff_lr", "angle",
            "grad_max_ratio", "frac_at_unit", "grid_changed", "sqnr8", "sqnr4"]
    cols = [c for c in cols if any(c in r for r in res.layers)]
    parts.append("<h2>Per layer (last logged step)</h2><table><tr>"
                 + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
    for r in res.layers:
        parts.append("<tr>" + "".join(f"<td>{_fmt(r[c]) if c in r else ''}</td>" for c in cols)
                     + "</tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserInputError("wnconvert report needs matplotlib: pip install 'wnconvert[report]'") from None
