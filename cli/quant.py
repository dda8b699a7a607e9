"""``wnconvert export --precision`` and ``wnconvert eval``, as plain functions the commands call."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wnconvert.convert.errors import ParityError, UserInputError

DEFAULT_CALIB_SAMPLES = 256


def parse_act_bits(value: str | None, precision: str) -> int | None:
    if value is None:
        return 8 if precision == "int8" else None
    v = value.strip().lower()
    if v in ("float", "fp32", "none", "0"):
        return None
    if v in ("8", "int8"):
        return 8
    raise UserInputError(f"--act-bits must be 8 or float, not {value!r}")


def calibration_arrays(data: str, preprocess, samples: int) -> np.ndarray:
    from wnconvert.models.data import eval_arrays

    if samples < 1:
        raise UserInputError("--calib-samples must be at least 1")
    images, _ = eval_arrays(data, preprocess, limit=samples)
    return images


def export_precision(run_dir: Path, precision: str, *, data: str | None = None,
                     calib_samples: int = DEFAULT_CALIB_SAMPLES, act_bits: str | None = None,
                     per_channel: bool | None = None, calibrate_method: str = "minmax",
                     rtol: float | None = None) -> dict:
    """Write ``RUN_DIR/model.<precision>.onnx`` from ``RUN_DIR/model.onnx`` and compare them.

    Returns the entry written to ``report.json["quantized"][precision]``. Raises ParityError when a
    ``--weight-bits`` run exported weights-only at a precision holding its grid does not match the
    fp32 model within the run's tolerance (its weights are lossless)."""
    from wnconvert.convert.artifacts import read_json, write_json
    from wnconvert.convert.quantize import (QuantOptions, artifact_name, check_precision,
                                            compare_files, quantize, weight_storage)
    from wnconvert.convert.verify import VerifyConfig, make_inputs
    from wnconvert.models.data import Preprocess
    from wnconvert.models.run import REPORT, finish_manifest, load_manifest

    check_precision(precision)
    manifest = load_manifest(run_dir)
    src = Path(run_dir) / "model.onnx"
    if not src.exists():
        raise UserInputError(f"{run_dir} has no model.onnx; run `wnconvert export {run_dir}` first")
    scheme = manifest.get("scheme") or {}
    grid_bits = scheme.get("weight_bits")
    options = QuantOptions(
        precision=precision, act_bits=parse_act_bits(act_bits, precision),
        per_channel=(scheme.get("scheme") != "layer-max") if per_channel is None else per_channel,
        calibrate_method=calibrate_method, grid_bits=grid_bits)
    pre = Preprocess.from_dict(manifest["preprocess"])
    calib = None
    if options.needs_calibration:
        if not data:
            raise UserInputError(f"--precision {precision} quantizes activations and needs calibration "
                                 "data: pass --data SPEC (or --act-bits float for weights only)")
        calib = calibration_arrays(data, pre, calib_samples)
    dst = Path(run_dir) / artifact_name(precision)
    result = quantize(src, dst, options, calib)

    ver = VerifyConfig(**manifest.get("verify", {}))
    tol = ver.rtol if rtol is None else rtol
    if calib is not None:
        x, inputs = calib, f"{len(calib)} calibration images from {data}"
    elif data:
        x = calibration_arrays(data, pre, calib_samples)
        inputs = f"{len(x)} images from {data}"
    else:
        x = make_inputs((3, pre.image_size, pre.image_size), ver).numpy()
        inputs = f"{len(x)} generated samples"
    entry = result.to_dict() | {"inputs": inputs, "vs_fp32": compare_files(src, dst, x),
                                "weight_storage": weight_storage(dst)}
    lossless = (grid_bits is not None and options.act_bits is None and precision in ("int8", "int4")
                and not result.lossy_weights and result.exact_weights)
    if lossless:
        entry["lossless_check"] = {"rtol": tol, "passed": entry["vs_fp32"]["rel"] <= tol}
    report_path = Path(run_dir) / REPORT
    report = read_json(report_path) if report_path.exists() else {}
    report.setdefault("quantized", {})[precision] = entry
    write_json(report_path, report)
    finish_manifest(Path(run_dir), manifest)
    if lossless and not entry["lossless_check"]["passed"]:
        raise ParityError(f"{dst.name}: weights are on the trained {grid_bits}-bit grid but the logits "
                          f"differ from model.onnx by rel {entry['vs_fp32']['rel']:.3g} > {tol:g}")
    return entry


def eval_artifact(artifact: Path, data: str, limit: int | None, batch_size: int, provider: str) -> dict:
    from wnconvert.models.evaluate import evaluate

    return evaluate(artifact, data, limit=limit, batch=batch_size, provider=provider)


# -- the `eval` command (registered in cli/main.py) --------------------------------------------------

import typer  # noqa: E402
from typing import Optional  # noqa: E402

from .errors import handle_errors  # noqa: E402


@handle_errors
def eval_command(
    artifact: Path = typer.Argument(..., help="An .onnx file, a run directory or its checkpoint.safetensors."),
    data: str = typer.Option(..., help="Data spec, e.g. fashion-mnist:PATH (validation split)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate a fixed random subset of N images."),
    batch_size: int = typer.Option(64, help="Batch size."),
    provider: str = typer.Option("cpu", help="cpu | cuda (onnxruntime provider, or PyTorch device)."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
):
    """Top-1 / top-5 and images/s of a checkpoint (PyTorch) or an ONNX file (onnxruntime)."""
    from .render import console, print_json

    res = eval_artifact(artifact, data, limit, batch_size, provider)
    if json_out:
        print_json(res)
        return
    console.print(f"{res['artifact']} on {res['images']} images of {res['data']} ({res['backend']}): "
                  f"top-1 {res['top1']:.4f}, top-5 {res['top5']:.4f}, {res['images_per_s']:.1f} images/s")
