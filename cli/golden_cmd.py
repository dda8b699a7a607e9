"""``wnconvert golden RUN --out DIR``: every layer's integer output for a hardware team."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import handle_errors
from .render import JsonOpt, console, print_json


@handle_errors
def golden(
    run_dir: Path = typer.Argument(..., help="A run directory with an exported integer file."),
    out: Path = typer.Option(..., help="Folder for golden.npz and index.json."),
    data: Optional[str] = typer.Option(None, help="Images to run (validation split; default: the run's --data)."),
    count: int = typer.Option(8, help="Number of images."),
    precision: str = typer.Option("int8", help=(
        "int8 | int4: which model.<precision>.onnx; tflite: model.int8.tflite in TFLite's arithmetic "
        "(docs/tflite.md); qonnx: model.qonnx.onnx, checked in qonnx's executor against the integer reference first.")),
    onnx_file: Optional[Path] = typer.Option(None, "--onnx", help="Another QDQ file instead of the run's."),
    json_out: bool = JsonOpt,
):
    """Run the pure-integer reference on real images and write every quantized tensor (golden.npz)
    with its scales, shifts and zero points (index.json)."""
    from wnconvert.models.run.precheck import check_golden

    check_golden(run_dir, out, data, count, precision, onnx_file)  # before torch, onnx and the data load
    from wnconvert.models.run.golden_run import golden_for_run

    s = golden_for_run(run_dir, out, data=data, count=count, precision=precision, onnx_file=onnx_file)
    if json_out:
        return print_json(s)
    mode = "integer-only (shifts)" if s["integer_only"] else \
        f"{len(s['not_integer_only'])} tensor(s) requantized by a float32 multiplier (scales not powers of two)"
    console.print(f"wrote {s['tensors']} tensors x {s['images']} images to {s['out_dir']}: {mode}; "
                  f"{s['reference_ms_per_image']:.1f} ms/image")
    if s.get("qonnx"):
        q = s["qonnx"]
        console.print(f"{q['file']} in qonnx's executor holds the same integers ({q['mode']}): "
                      + ", ".join(f"{k} {v}/{q['elements']}" for k, v in q["equal"].items()))
    if s["over_2_24"]:
        console.print(f"[yellow]{len(s['over_2_24'])} layer(s) accumulate beyond 2^24: float32 runtimes "
                      "are not exact there[/]")
