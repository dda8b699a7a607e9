"""``wnconvert report RUN_DIR``: figures, a self-contained report.html and a terminal summary."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from .errors import handle_errors


@handle_errors
def report(
    run_dir: Path = typer.Argument(..., help="A run directory (from `wnconvert finetune`)."),
    limit: int = typer.Option(12, help="Layers shown in the terminal summary (0: all)."),
):
    """Write RUN_DIR/report/report.html (figures embedded) and PNG figures: loss and accuracy,
    per-layer ||W||, effective LR, ||W||/||g|| against its equilibrium, weight histograms, SQNR."""
    from rich.table import Table

    from wnconvert.models.run.report import build_report, check_matplotlib

    from .render import console

    check_matplotlib()
    res = build_report(run_dir)
    t = Table(title=f"Layers of {run_dir}")
    cols = [("layer", "layer"), ("||W||", "w_norm"), ("||W||/||g||", "w_over_g"),
            ("equilibrium", "equilibrium"), ("eff. lr", "eff_lr"), ("at ±1", "frac_at_unit"),
            ("SQNR 8b", "sqnr8"), ("SQNR 4b", "sqnr4")]
    cols = [(h, k) for h, k in cols if k == "layer" or any(k in r for r in res.layers)]
    for h, _ in cols:
        if h == "layer":
            t.add_column(h, overflow="fold", min_width=14)
        else:
            t.add_column(h, justify="right", no_wrap=True)
    rows = res.layers if limit <= 0 else res.layers[:limit]
    for r in rows:
        t.add_row(*[_cell(r.get(k)) for _, k in cols])
    console.print(t)
    if len(rows) < len(res.layers):
        console.print(f"... {len(res.layers) - len(rows)} more layers in {res.html}")
    if res.final:
        console.print(f"final val top-1 {100 * res.final['val_top1']:.2f}%, "
                      f"val loss {res.final['val_loss']:.4f}", highlight=False)
    for note in res.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(f"wrote {res.html} and {len(res.figures)} figures in {res.out}", highlight=False)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    return str(v)
