"""``wnconvert export --precision`` and ``wnconvert eval``, as plain functions the commands call."""

from __future__ import annotations

from dataclasses import replace
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


CALIB_SPLITS = ("train", "val")


def data_arrays(data: str, preprocess, samples: int, split: str = "val", what: str = "--limit") -> np.ndarray:
    """``samples`` images of ``split`` (a fixed random subset), preprocessed like evaluation."""
    from wnconvert.models.data import eval_arrays

    if samples < 1:
        raise UserInputError(f"{what} must be at least 1")
    if split not in CALIB_SPLITS:
        raise UserInputError(f"--calib-split must be train or val, not {split!r}")
    images, _ = eval_arrays(data, preprocess, limit=samples, split=split)
    return images


def export_precision(run_dir: Path, precision: str, *, data: str | None = None,
                     calib_samples: int = DEFAULT_CALIB_SAMPLES, act_bits: str | None = None,
                     per_channel: bool | None = None, calibrate_method: str = "minmax",
                     rtol: float | None = None, calib_split: str = "train", act_type: str = "uint8",
                     fuse: bool | None = None) -> dict:
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
        per_channel=True if per_channel is None else per_channel,
        calibrate_method=calibrate_method, grid_bits=grid_bits, act_type=act_type, fuse=fuse)
    if per_channel is None and not options.fuses and scheme.get("scheme") == "layer-max":
        options = replace(options, per_channel=False)  # one scale per tensor, until BatchNorm is folded in
    pre = Preprocess.from_dict(manifest["preprocess"])
    calib = None
    if options.needs_calibration:
        if not data:
            raise UserInputError(f"--precision {precision} quantizes activations and needs calibration "
                                 "data: pass --data SPEC (or --act-bits float for weights only)")
        calib = data_arrays(data, pre, calib_samples, calib_split, "--calib-samples")
    dst = Path(run_dir) / artifact_name(precision)
    result = quantize(src, dst, options, calib)

    ver = VerifyConfig(**manifest.get("verify", {}))
    tol = ver.rtol if rtol is None else rtol
    if data:  # compared on held-out images, not on the calibration ones
        x = data_arrays(data, pre, calib_samples, "val", "--calib-samples")
        inputs = f"{len(x)} validation images from {data}"
    else:
        x = make_inputs((3, pre.image_size, pre.image_size), ver).numpy()
        inputs = f"{len(x)} generated samples"
    calibration = f"{len(calib)} {calib_split} images from {data}" if calib is not None else None
    entry = result.to_dict() | {"calibration": calibration, "inputs": inputs,
                                "vs_fp32": compare_files(src, dst, x), "weight_storage": weight_storage(dst)}
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


def quantized_artifacts(run_dir: Path) -> list[tuple[str, Path]]:
    """``(precision, path)`` of every ``model.<precision>.onnx`` present in the run."""
    from wnconvert.convert.quantize import PRECISIONS, artifact_name

    return [(p, Path(run_dir) / artifact_name(p)) for p in PRECISIONS
            if p != "fp32" and (Path(run_dir) / artifact_name(p)).exists()]


def verify_targets(run_dir: Path, onnx_file: Path | None, precision: str | None) -> list[tuple[str, Path]]:
    """``(precision, path)`` pairs ``verify`` checks: ``--onnx F`` alone (its precision read from
    the file), ``--precision P``'s file alone, or model.onnx and every low-precision file present."""
    from wnconvert.convert.quant_check import detect_precision
    from wnconvert.convert.quantize import artifact_name

    if onnx_file is not None and precision is not None:
        raise UserInputError("give --onnx or --precision, not both")
    if onnx_file is not None:
        if not onnx_file.exists():
            raise UserInputError(f"{onnx_file} does not exist")
        return [(detect_precision(onnx_file), onnx_file)]
    path = Path(run_dir) / artifact_name(precision or "fp32")
    if not path.exists():
        how = "" if precision in (None, "fp32") else f" --precision {precision}"
        raise UserInputError(f"{path} does not exist; run `wnconvert export {run_dir}{how}` first")
    return [(precision or "fp32", path)] + (quantized_artifacts(run_dir) if precision is None else [])


def verify_quantized(run_dir: Path, model, targets: list[tuple[str, Path]], x_parity, parity_cfg,
                     x: np.ndarray, inputs: str, thresholds) -> dict:
    """Check each low-precision file under its contract (see ``convert/quant_check.py``): a
    lossless one (report.json says export found every weight on the run's trained grid) against
    the trained model at the fp32 tolerance, any other against ``model.onnx``."""
    from wnconvert.convert.artifacts import read_json
    from wnconvert.convert.quant_check import check_lossy
    from wnconvert.convert.quantize import artifact_name
    from wnconvert.convert.verify import verify as run_verify
    from wnconvert.models.run import REPORT

    report_path = Path(run_dir) / REPORT
    made = (read_json(report_path).get("quantized", {}) if report_path.exists() else {})
    fp32 = Path(run_dir) / "model.onnx"
    out = {}
    for precision, path in targets:
        own = path.resolve() == (Path(run_dir) / artifact_name(precision)).resolve()
        if own and "lossless_check" in made.get(precision, {}):
            rep = run_verify(model, x_parity, onnx_path=path, config=parity_cfg,
                             inputs_name=f"{len(x_parity)} samples")
            res = {"contract": "lossless", "parity": rep.to_dict(), "passed": rep.passed,
                   "failures": rep.failures()}
        else:
            if not fp32.exists():
                raise UserInputError(f"{run_dir} has no model.onnx to compare {path.name} with")
            res = check_lossy(fp32, path, x, thresholds) | {"inputs": inputs}
        out[precision if own else str(path)] = res | {"file": str(path)}
    return out


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
