"""Folding and exporting a run directory again: ``wnconvert fold`` / ``export [--precision P]``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from wnconvert.convert.errors import ParityError, UserInputError
from wnconvert.convert.fold import FoldConfig, FoldResult, fold_model
from wnconvert.convert.pipeline import ConversionResult, convert, example_inputs
from wnconvert.convert.quantize import QuantOptions, check_precision, compare_files, quantize, weight_storage
from wnconvert.convert.quantize.targets import DEFAULT_TARGET
from wnconvert.convert.schemes import REGISTRY
from wnconvert.convert.verify import make_inputs

from ..data.data import Preprocess, eval_arrays
from ..files import artifact_name
from .act_files import trained_entry, trained_source
from .precheck import check_calibration, check_container_use, parse_act_bits  # noqa: F401 (re-exported)
from .run_options import CALIB_SPLITS, PrecisionOptions  # noqa: F401 (PrecisionOptions re-exported)
from .run_target import TRAINED, check_run_target, record_target, resolve_target, rules_guard
from .rundir import Manifest, RunDir, writes_run


def data_arrays(data: str, preprocess: Preprocess, samples: int, split: str = "val",
                what: str = "--limit") -> np.ndarray:
    """``samples`` images of ``split`` (a fixed random subset), preprocessed like evaluation."""
    if samples < 1:
        raise UserInputError(f"{what} must be at least 1")
    if split not in CALIB_SPLITS:
        raise UserInputError(f"--calib-split must be train or val, not {split!r}")
    images, _ = eval_arrays(data, preprocess, limit=samples, split=split)
    return images


def _fold_override(fold: FoldConfig, bn: str | None, granularity: str | None) -> FoldConfig:
    return FoldConfig(bn or fold.bn, granularity or fold.granularity)


def fold_run(run_dir: Path, bn: str | None = None, granularity: str | None = None) -> tuple[FoldConfig, FoldResult]:
    """Fold the run's checkpoint (the run's fold settings unless overridden); writes nothing."""
    manifest, model, _ = RunDir(run_dir).load()
    cfg = _fold_override(manifest.fold, bn, granularity)
    return cfg, fold_model(model, example_inputs(manifest.input_shape), cfg)


@writes_run
def export_run(run_dir: Path, *, bn: str | None = None, granularity: str | None = None,
               opset: int | None = None, rtol: float | None = None,
               target: str = DEFAULT_TARGET, container: str | None = None) -> ConversionResult:
    """Fold the run's checkpoint again and write ``model.onnx``, its weight ranges and parity into
    report.json; the overrides become the run's settings in the manifest. The caller checks
    parity (``pipeline.require_parity``) once it has shown the result. Raises ParityError, with
    the previous model.onnx, report and manifest untouched, when the file breaks ``target``'s
    structural rules."""
    check_container_use("fp32", container)
    run = RunDir(run_dir)
    preset = resolve_target(target, {})[0]
    manifest, model, _ = run.load()
    check_run_target(manifest, preset, "fp32", False)
    manifest.fold = _fold_override(manifest.fold, bn, granularity)
    if opset:
        manifest.export = replace(manifest.export, opset=opset)
    if rtol is not None:
        manifest.verify = replace(manifest.verify, rtol=rtol)
    result = convert(model, manifest.input_shape, run.onnx_path, fold_config=manifest.fold,
                     export_config=manifest.export, verify_config=manifest.verify,
                     check=rules_guard(preset, run.onnx_path.name))
    run.update_report(result.to_dict())
    record_target(run, manifest, run.onnx_path, preset, {"opset": manifest.export.opset}, [])
    run.finish(manifest)
    return result


def quant_options(precision: str, opts: PrecisionOptions, scheme, settings: dict | None = None) -> QuantOptions:
    """The quantizer's options for a run trained under ``scheme`` (a SchemeConfig), with a
    target's ``settings`` (default: those of ``opts.target`` with ``opts`` over them)."""
    settings = settings or resolve_target(opts.target, _overrides(opts))[1]
    per_channel = settings["per_channel"]
    options = QuantOptions(
        precision=precision, act_bits=parse_act_bits(opts.act_bits, precision),
        per_channel=True if per_channel is None else per_channel,
        calibrate_method=opts.calibrate_method, grid_bits=scheme.weight_bits,
        act_type=settings["act_type"], fuse=opts.fuse, act_symmetric=settings["act_symmetric"],
        quantize_bias=settings["quantize_bias"], container=settings.get("container", "int4"),
        residual_conv=settings.get("residual_conv", "quantized"))
    if per_channel is None and not options.fuses and not REGISTRY[scheme.scheme].per_channel:
        options = replace(options, per_channel=False)  # one scale per tensor, until BatchNorm is folded in
    return options


def _overrides(opts: PrecisionOptions) -> dict:
    """The explicit options that override a target's settings (None: not given)."""
    return {"act_type": opts.act_type, "per_channel": opts.per_channel, "container": opts.container}


def file_settings(precision: str, preset, settings: dict, overridden: list[str], opts: PrecisionOptions,
                  weights_only: bool) -> tuple[dict, list[str]]:
    """The target's settings as they apply to a ``precision`` file, and the overridden ones: the
    container of 4-bit values only for int4 files, INT4 for weights-only ones unless
    ``--container`` says otherwise (float activations get no integer kernel from an int8 container)."""
    settings, overridden = dict(settings), [o for o in overridden if o != "container"]
    settings.pop("container")
    default = "int4" if weights_only else preset.container
    if precision != "int4":
        return settings, overridden
    settings["container"] = opts.container or default
    if settings["container"] != default:
        overridden = sorted(overridden + ["container"])
    return settings, overridden


def _calibration(manifest: Manifest, precision: str, options: QuantOptions,
                 opts: PrecisionOptions) -> tuple[np.ndarray | None, str | None, str | None]:
    """Calibration images (when the options quantize activations), the data spec images come
    from (``--data``, else the run's own) and the report's line on them."""
    data = opts.data or manifest.data
    if not options.needs_calibration:
        return None, data, None
    if not data:
        raise UserInputError(f"--precision {precision} quantizes activations and needs calibration "
                             "data; the run was trained without --data: pass --data SPEC "
                             "(or --act-bits float for weights only)")
    calib = data_arrays(data, manifest.preprocess, opts.calib_samples, opts.calib_split, "--calib-samples")
    source = "--data" if opts.data else "the run's data"
    return calib, data, f"{len(calib)} {opts.calib_split} images from {data} ({source})"


@writes_run
def export_precision(run_dir: Path, precision: str, opts: PrecisionOptions = PrecisionOptions()) -> dict:
    """Write ``RUN_DIR/model.<precision>.onnx`` for ``opts.target``: from an ``--act-bits`` run's
    QAT model with its trained scales, else from ``RUN_DIR/model.onnx`` (calibrated on data when
    activations are quantized), both through ``convert.quantize.quantize``'s formats.

    Returns the entry written to ``report.json["quantized"][precision]``. Raises ParityError when a
    ``--weight-bits`` run exported weights-only at a precision holding its grid does not match the
    fp32 model within the run's tolerance (its weights are lossless), or, before anything is
    written, when the file breaks the target's structural rules."""
    check_precision(precision)
    check_container_use(precision, opts.container)
    run = RunDir(run_dir)
    manifest = run.manifest()
    preset, settings, overridden = resolve_target(opts.target, _overrides(opts))
    trained = manifest.act is not None and precision != "fp16"  # the run's own integer network
    weights_only = not trained and parse_act_bits(opts.act_bits, precision) is None
    check_run_target(manifest, preset, precision, weights_only)
    settings, overridden = file_settings(precision, preset, settings, overridden, opts, weights_only)
    dst = run.path / artifact_name(precision)
    if trained:
        source, options = trained_source(run, precision, opts.act_bits, opts.data, settings.get("container", "int4"))
        calib = None
    else:
        if not run.onnx_path.exists():
            raise UserInputError(f"{run_dir} has no model.onnx; run `wnconvert export {run_dir}` first")
        source, options = run.onnx_path, quant_options(precision, opts, manifest.scheme, settings)
        calib, data, calibration = _calibration(manifest, precision, options, opts)
    result = quantize(source, dst, options, calib, check=rules_guard(preset, dst.name))  # the one road

    if trained:
        entry = trained_entry(manifest, source, result)
        own = dict(TRAINED) | {"residual_conv": manifest.act.residual_conv} | (
            {"container": options.container} if precision == "int4" else {})
        entry["target"] = record_target(run, manifest, dst, preset, own, [o for o in overridden if o == "container"],
                                        trained=manifest.act.residual_conv)
        check = None
    else:
        entry, check = _calibrated_entry(manifest, run.onnx_path, result, opts, data, calibration)
        entry["target"] = record_target(run, manifest, dst, preset, settings, overridden)
    run.update_report(lambda report: report.setdefault("quantized", {}).__setitem__(precision, entry))
    run.finish(manifest)
    if check is not None and not check["passed"]:
        raise ParityError(f"{dst.name}: weights are on the trained {options.grid_bits}-bit grid but the "
                          f"logits differ from model.onnx by rel {entry['vs_fp32']['rel']:.3g} > {check['rtol']:g}")
    return entry


def _calibrated_entry(manifest: Manifest, src: Path, result, opts: PrecisionOptions, data: str | None,
                      calibration: str | None) -> tuple[dict, dict | None]:
    """report.json's entry of a file made from model.onnx: its comparison with model.onnx on
    held-out images, and the lossless check when its weights are the run's grid and its
    activations float (None otherwise)."""
    dst, options = result.path, result.options
    if data:  # compared on held-out images, not on the calibration ones
        x = data_arrays(data, manifest.preprocess, opts.calib_samples, "val", "--calib-samples")
        inputs = f"{len(x)} validation images from {data}"
    else:
        x = make_inputs(manifest.input_shape, manifest.verify).numpy()
        inputs = f"{len(x)} generated samples"
    entry = result.to_dict() | {"calibration": calibration, "inputs": inputs,
                                "vs_fp32": compare_files(src, dst, x), "weight_storage": weight_storage(dst)}
    lossless = (options.grid_bits is not None and options.act_bits is None
                and options.precision in ("int8", "int4") and not result.lossy_weights and result.exact_weights)
    if not lossless:
        return entry, None
    tol = manifest.verify.rtol if opts.rtol is None else opts.rtol
    entry["lossless_check"] = {"rtol": tol, "passed": entry["vs_fp32"]["rel"] <= tol}
    return entry, entry["lossless_check"]
