"""``wnconvert eval ARTIFACT --data SPEC``: accuracy and speed of an ONNX file or a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import handle_errors
from .options import Provider, Runtime, value
from .render import JsonOpt, console, print_json


@handle_errors
def eval_command(
    artifact: Path = typer.Argument(..., help=(
        "An .onnx or .tflite file, a run directory or its checkpoint.safetensors.")),
    data: str = typer.Option(..., help="Data spec, e.g. fashion-mnist:PATH (validation split)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate a fixed random subset of N images."),
    batch_size: int = typer.Option(64, help="Batch size."),
    provider: Provider = typer.Option("cpu", help="onnxruntime provider, or PyTorch device."),
    runtime: Runtime = typer.Option("onnxruntime", help=(
        "Runtime of an .onnx file (openvino: its CPU plugin at f32); of a .tflite file: tflite-micro (the default for"
        " it) or litert.")),
    json_out: bool = JsonOpt,
):
    """Top-1 / top-5 and images/s of a checkpoint (PyTorch), an ONNX file (onnxruntime or OpenVINO) or a
    .tflite file (TensorFlow Lite Micro or LiteRT)."""
    from wnconvert.models.run.precheck import check_eval

    check_eval(artifact, value(provider), batch_size)  # before torch, onnx and the data load
    from wnconvert.models.run.accuracy import artifact_accuracy

    res = artifact_accuracy(artifact, data, limit=limit, batch=batch_size, provider=value(provider),
                            runtime=value(runtime))
    if json_out:
        print_json(res)
        return
    console.print(f"{res['artifact']} on {res['images']} images of {res['data']} ({res['backend']}): "
                  f"top-1 {res['top1']:.4f}, top-5 {res['top5']:.4f}, {res['images_per_s']:.1f} images/s")
