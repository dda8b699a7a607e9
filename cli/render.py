"""rich tables for the terminal; every command also has ``--json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=False, highlight=False)

JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def certificate_table(certificate: list[dict], limit: int | None = 40) -> Table:
    """The per-layer fold certificate; layer names are never cut (one scheme for every layer goes
    into the title, so the table fits 80 columns for torchvision's names)."""
    schemes = sorted({c["scheme"] for c in certificate})
    one = len(schemes) == 1
    t = Table(title="Fold certificate" + (f" ({schemes[0]})" if one else ""), show_lines=False)
    cols = ("layer", "max|stored|", "scale", "rel. diff") if one else ("layer", "scheme", "max|stored|", "scale",
                                                                      "rel. diff")
    for col in cols:
        t.add_column(col, justify="right" if col in ("max|stored|", "rel. diff") else "left",
                     no_wrap=col == "layer")
    rows = certificate if limit is None else certificate[:limit]
    for c in rows:
        cells = (c["layer"],) + (() if one else (c["scheme"],))
        t.add_row(*cells, f"{c['stored_max_abs']:.6f}", c["scale"], f"{c['rel_diff']:.2e}")
    if limit is not None and len(certificate) > limit:
        t.caption = f"{len(certificate) - limit} more layers in report.json (worst rel. diff " \
                    f"{max(c['rel_diff'] for c in certificate):.2e})"
    return t


def parity_table(parity: dict, title: str = "Parity") -> Table:
    t = Table(title=f"{title} (reference: {parity['reference']}, {parity['inputs']})")
    for col in ("candidate", "max abs", "rel", "cosine", "top-1", "ok"):
        t.add_column(col, justify="left" if col == "candidate" else "right")
    for name, c in parity["candidates"].items():
        t.add_row(name, f"{c['max_abs']:.3e}", f"{c['rel']:.3e}", f"{c['cosine']:.8f}",
                  f"{c['top1']:.4f}", "[green]yes[/]" if c["passed"] else "[red]NO[/]")
    return t


def quantized_table(checks: dict) -> Table:
    """One row per low-precision file: its contract and the numbers it was judged by."""
    t = Table(title="Low-precision files")
    for col in ("file", "contract", "against", "top-1 agree", "SQNR dB", "rel", "ok"):
        t.add_column(col, justify="left" if col in ("file", "contract", "against") else "right")
    for name, r in checks.items():
        if r["contract"] == "bit-exact":
            first = r["first_difference"]
            equal = sum(not layer["differ"] for layer in r["layers"])
            row = (f"QAT model, integer reference, onnxruntime off/on, {r['inputs']}", "-", "-",
                   f"{equal}/{len(r['layers'])} tensors equal" if first is None else
                   f"first differs: {first['tensor']} ({first['differ']} elements)")
        elif r["contract"] == "qonnx":
            first = r["first_difference"]
            eq = min(r["equal"].values(), default=0)
            row = (f"QDQ file: onnxruntime off/on, integer reference ({r['mode']}), {r['inputs']}", "-", "-",
                   f"{eq}/{r['elements']} equal" if first is None else
                   f"first differs: {first['point']} ({first['differ']} elements)")
        elif r["contract"] == "lossless-activations":
            levels = r["levels"].values()
            top = [lv["logits"] for lv in levels]
            agree = 1 - sum(t["disagree"] for t in top) / max(sum(t["compared"] for t in top), 1)
            ties = sum(sum(t.values()) for t in r["ties"].values())
            row = (f"QAT model, {r['inputs']}", f"{agree:.4f}", "-", f"{ties} ties")
        elif r["contract"] == "lossless":
            worst = max(r["parity"]["candidates"].values(), key=lambda c: c["rel"])
            row = ("trained model, float64", f"{worst['top1']:.4f}", "-", f"{worst['rel']:.2e}")
        else:
            c = r["vs_fp32"]
            row = (f"model.onnx, {r['inputs']}", f"{c['top1_agreement']:.4f}", f"{c['sqnr_db']:.1f}",
                   f"{c['rel']:.2e}")
        t.add_row(Path(r["file"]).name, r["contract"], *row, "[green]yes[/]" if r["passed"] else "[red]NO[/]")
    return t


def ranges_table(ranges: list[dict], title: str, limit: int | None = 40) -> Table:
    t = Table(title=title)
    for col in ("tensor", "shape", "max|w|", "in [-1, 1]"):
        t.add_column(col, justify="left" if col == "tensor" else "right")
    rows = ranges if limit is None else ranges[:limit]
    for r in rows:
        t.add_row(r["name"], "x".join(map(str, r["shape"])), f"{r['max_abs']:.6g}",
                  "[green]yes[/]" if r["in_unit_range"] else "[red]no[/]")
    if limit is not None and len(ranges) > limit:
        bad = sum(not r["in_unit_range"] for r in ranges)
        t.caption = f"{len(ranges) - limit} more; {bad} of {len(ranges)} outside [-1, 1]"
    return t


def certificate_line(certificate: list[dict]) -> str:
    """The fold certificate in one line: how many layers, the largest stored weight, the worst
    relative difference (the table: report.json, ``finetune --verbose``, ``wnconvert fold``)."""
    if not certificate:
        return "fold certificate: no layer"
    worst = max(certificate, key=lambda c: c["rel_diff"])
    top = max(c["stored_max_abs"] for c in certificate)
    return (f"fold certificate: {len(certificate)} layers, max |stored| {top:.6f}, worst rel. diff "
            f"{worst['rel_diff']:.2e} ({worst['layer']})")


def parity_line(parity: dict, what: str = "parity") -> str:
    """A parity table in one line: passed or not, its worst candidate, against what, on what."""
    cands = parity["candidates"]
    worst = max(cands.values(), key=lambda c: c["rel"]) if cands else None
    verdict = "[green]passed[/]" if parity["passed"] else "[red]FAILED[/]"
    detail = (f", worst rel {worst['rel']:.2e}, min cosine {min(c['cosine'] for c in cands.values()):.8f}, "
              f"top-1 {min(c['top1'] for c in cands.values()):.4f}" if worst else "")
    return f"{what}: {verdict} ({len(cands)} runs of model.onnx against the {parity['reference']}, " \
           f"{parity['inputs']}{detail})"
