"""``wnconvert fold | export | verify RUN_DIR``: a run directory folded, exported and checked again.

Each command parses its options, makes one call into ``wnconvert.models`` and renders the result.
That call's module is imported in the command's body, the one place it is needed: it loads torch
and onnx, which ``--help`` and a parser error must not wait for (the options' defaults come from
the light ``run_options``/``configs`` modules)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from wnconvert.convert.configs import QuantThresholds, VerifyConfig
from wnconvert.convert.errors import ParityError
from wnconvert.convert.names import ETHOS_U_TARGETS, TFLITE_IO
from wnconvert.models.run.run_options import PrecisionOptions, VerifyRequest

from .errors import handle_errors
from .options import (
    ActType,
    Bn,
    Calibrator,
    CalibSplit,
    Container,
    Granularity,
    Precision,
    Target,
    VerifyPrecision,
    choices,
    default,
    value,
)
from .render import JsonOpt, certificate_table, console, parity_table, print_json, quantized_table

TfliteIo = choices("TfliteIo", TFLITE_IO)

@handle_errors
def fold(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    bn: Optional[Bn] = typer.Option(None, help="Default: the run's."),
    granularity: Optional[Granularity] = typer.Option(None, help="Default: the run's."),
    json_out: bool = JsonOpt,
):
    """Fold the run's checkpoint into static weights and print the per-layer certificate."""
    from wnconvert.models.run.run_export import fold_run

    cfg, result = fold_run(run_dir, value(bn), value(granularity))
    cert = result.certificate()
    if json_out:
        print_json({"fold": asdict(cfg), "certificate": cert, "stored_max_abs": result.max_stored})
        return
    console.print(certificate_table(cert, limit=None))
    console.print(f"max |stored weight| = {result.max_stored:.6f}, worst layer rel. diff = {result.max_rel_diff:.2e}")


@handle_errors
def export(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    bn: Optional[Bn] = typer.Option(None, help="Default: the run's."),
    granularity: Optional[Granularity] = typer.Option(None, help="Default: the run's."),
    opset: Optional[int] = typer.Option(None, help="ONNX opset (default: the run's)."),
    rtol: Optional[float] = typer.Option(None, help="Parity tolerance (default: the run's)."),
    precision: Precision = typer.Option("fp32", help=(
        "fp32: model.onnx; otherwise writes model.PRECISION.onnx from model.onnx.")),
    target: Target = typer.Option(default(PrecisionOptions, "target"), help=(
        "Deployment target: its preset of activation type and symmetry, weight granularity, bias and opset rules "
        "(explicit options override it; see docs/deploying.md). ethos-u*: compile RUN/model.int8.tflite with Arm's "
        "Vela (docs/ethos-u.md).")),
    data: Optional[str] = typer.Option(None, help=(
        "Calibration data spec for int8 activations (default: the run's --data).")),
    calib_samples: int = typer.Option(default(PrecisionOptions, "calib_samples"), help=(
        "Calibration images taken from --data.")),
    calib_split: CalibSplit = typer.Option(default(PrecisionOptions, "calib_split"), help=(
        "The split of --data calibration images come from (comparisons with model.onnx use val).")),
    act_bits: Optional[str] = typer.Option(None, help=(
        "8 | float: activations of int8/int4 files (default: 8 for int8, float for int4).")),
    per_channel: Optional[bool] = typer.Option(None, "--per-channel/--per-tensor", help=(
        "Weight scales (default: per channel, except per tensor for layer-max weights-only files).")),
    calibrate_method: Calibrator = typer.Option(default(PrecisionOptions, "calibrate_method"), help=(
        "Activation range calibration.")),
    act_type: Optional[ActType] = typer.Option(None, help=(
        "Type of quantized activations (default: the target's; uint8 is onnxruntime's fast CPU path).")),
    fuse: Optional[bool] = typer.Option(None, "--fuse/--no-fuse", help=(
        "Fold BatchNorm and scales into Conv before quantizing activations (default: yes; a --weight-bits run's grid "
        "stays exact, per channel).")),
    container: Optional[Container] = typer.Option(None, help=(
        "Storage of the 4-bit values of an int4 file: int4 (opset-21 INT4/UINT4) or int8 (the same integers in "
        "int8/uint8, weights in [-7, 7]: onnxruntime's int8 kernels). Default: the target's for files with quantized "
        "activations (ort-cpu: int8), int4 for weights-only files.")),
    io: Optional[TfliteIo] = typer.Option(None, help=(
        "--target tflite-micro: int8 input and output (default, the MCU convention) or float (QUANTIZE/DEQUANTIZE at "
        "the edges).")),
    json_out: bool = JsonOpt,
):
    """Fold the run's checkpoint, write RUN_DIR/model.onnx, check weight ranges and parity.
    With --precision fp16|int8|int4: write RUN_DIR/model.PRECISION.onnx from model.onnx instead.
    With --target tflite-micro: write RUN_DIR/model.int8.tflite (docs/tflite.md); with --target ethos-u*:
    compile it with Vela into RUN_DIR/model.int8.TARGET.tflite (docs/ethos-u.md)."""
    from wnconvert.convert.errors import UserInputError
    from wnconvert.models.run import precheck

    precheck.check_not_busy(run_dir)  # then every refusal the options and the manifest decide, before torch loads
    if value(target) in ETHOS_U_TARGETS:
        precheck.check_ethos_u_export(run_dir, value(target), value(precision))
        return _export_ethos_u(run_dir, value(target), value(precision), json_out)
    if value(target) == "tflite-micro":
        if value(precision) not in ("fp32", "int8") or container is not None or value(act_type) not in (None, "int8"):
            raise UserInputError("--target tflite-micro writes one int8 file: leave --precision (or give int8), "
                                 "--container and --act-type out")
        opts = PrecisionOptions(data=data, calib_samples=calib_samples, calib_split=value(calib_split),
                                act_bits=act_bits, per_channel=per_channel, calibrate_method=value(calibrate_method),
                                fuse=fuse, target="tflite-micro")
        precheck.check_tflite_export(run_dir, opts)
        from wnconvert.models.run.run_tflite import export_tflite

        entry = export_tflite(run_dir, opts, value(io) or "int8")
        return print_json(entry) if json_out else console.print(tflite_line(run_dir, entry))
    if io is not None:
        raise UserInputError("--io applies to --target tflite-micro")
    if value(target) == "qonnx":  # model.qonnx.onnx: QONNX Quant nodes, not a QDQ file
        given = {"--precision": value(precision) != "fp32", "--bn": bn is not None,
                 "--granularity": granularity is not None,
                 "--opset": opset is not None, "--rtol": rtol is not None, "--data": data is not None,
                 "--act-bits": act_bits is not None, "--per-channel/--per-tensor": per_channel is not None,
                 "--act-type": act_type is not None, "--fuse/--no-fuse": fuse is not None,
                 "--container": container is not None}
        given = [k for k, v in given.items() if v]
        precheck.check_qonnx_values(precheck.manifest_of(run_dir).get("act") is not None, given)
        from wnconvert.models.run.qonnx_run import export_qonnx_run

        entry = export_qonnx_run(run_dir, given)
        if json_out:
            return print_json(entry)
        bits = sorted(set(entry["activation_bits"].values()))
        return console.print(f"wrote {run_dir / entry['file']} (QONNX, W{entry['weight_bits']}A"
                             f"{'/'.join(map(str, bits))}, {entry['quant_nodes']} Quant nodes, "
                             f"{len(entry['points'])} activation points, scales {entry['scale_format']})")
    opts = PrecisionOptions(data=data, calib_samples=calib_samples, calib_split=value(calib_split),
                            act_bits=act_bits, per_channel=per_channel, rtol=rtol,
                            calibrate_method=value(calibrate_method), act_type=value(act_type), fuse=fuse,
                            target=value(target), container=value(container))
    precheck.check_export(run_dir, value(precision), opts)  # before torch, onnx and the model load
    from wnconvert.convert.pipeline import require_parity
    from wnconvert.models.run.run_export import export_precision, export_run

    if value(precision) != "fp32":
        entry = export_precision(run_dir, value(precision), opts)
        return print_json(entry) if json_out else console.print(quantized_line(run_dir, entry))
    result = export_run(run_dir, bn=value(bn), granularity=value(granularity), opset=opset, rtol=rtol,
                        target=value(target), container=value(container))
    if json_out:
        print_json(result.to_dict())
    else:
        console.print(parity_table(result.to_dict()["parity"]))
        console.print(f"wrote {result.onnx_path} ({result.onnx_weights} weight tensors, max |w| = "
                      f"{result.onnx_max_abs:.6f})")
    require_parity(result)


def _export_ethos_u(run_dir: Path, target: str, precision: str, json_out: bool) -> None:
    """``export --target ethos-u*``: RUN/model.int8.tflite compiled by Vela (models/run/ethosu_run.py)."""
    from wnconvert.convert.ethosu import describe
    from wnconvert.models.run.ethosu_run import export_ethos_u

    entry = export_ethos_u(run_dir, target, precision)
    if json_out:
        return print_json(entry)
    console.print(f"wrote {Path(run_dir) / entry['file']}: {describe(entry)}")


def tflite_line(run_dir: Path, entry: dict) -> str:
    ops = ", ".join(f"{n} {k}" for k, n in entry["operators"].items())
    how = "trained scales" if entry["scales"] == "trained" else f"calibrated on {entry['calibration']}"
    return (f"wrote {run_dir / entry['file']} ({entry['bytes'] / 1e6:.2f} MB, {entry['io']} input and output, "
            f"{how}; {ops})")


def tflite_verify_line(name: str, res: dict) -> str:
    if "one_step" not in res:
        return f"{name}: [red]{res['failures'][0]}[/]"
    t, o = res["top1"], res["one_step"]
    return (f"{name} ({res['inputs']}): TensorFlow Lite Micro = integer reference "
            f"{'yes' if res['micro_equals_reference'] else '[red]no[/]'}, LiteRT BUILTIN_REF = TFLite Micro "
            f"{'yes' if res['litert_ref_equals_micro'] else '[red]no[/]'}; trained network: {o['elements']} of "
            f"{o['of']} elements one step off, top-1 agreement {t['agreement']:.4f} "
            f"(differences only within the derived margin: {'yes' if not res['failures'] else '[red]no[/]'}); "
            f"XNNPACK: {res['xnnpack']['differing_elements']} logit elements differ")


def quantized_line(run_dir: Path, entry: dict) -> str:
    """What ``export --precision P`` wrote, for which target, calibrated on what."""
    t = entry["target"]
    target = f"target {t['name']}" + (f", {', '.join(t['overridden'])} overridden" if t["overridden"] else "")
    if entry.get("contract") == "lossless-activations":
        box = f", 4-bit values in {entry['container']}" if entry.get("container") else ""
        return (f"wrote {run_dir / entry['file']} (W{entry['weight_bits']}A{entry['act_bits']}, trained scales, "
                f"{len(entry['points'])} quantized tensors, opset {entry['opset']}{box}; {target})")
    c = entry["vs_fp32"]
    calib = f"; calibrated on {entry['calibration']}" if entry.get("calibration") else ""
    return (f"wrote {run_dir / entry['file']} ({entry['activations']} activations, weights "
            f"{entry['weight_storage'] or 'fp16'}; {target}{calib}): top-1 agreement "
            f"{c['top1_agreement']:.4f}, cosine {c['cosine_min']:.6f}, SQNR {c['sqnr_db']:.1f} dB")


@handle_errors
def verify(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    onnx_file: Optional[Path] = typer.Option(None, "--onnx", help=(
        "ONNX file (default RUN_DIR/model.onnx and every model.<precision>.onnx).")),
    precision: Optional[VerifyPrecision] = typer.Option(None, help=(
        "Check only RUN_DIR's model.onnx (fp32), model.<precision>.onnx or model.qonnx.onnx (qonnx: qonnx's executor "
        "against the run's QDQ file, docs/qonnx.md).")),
    inputs: Optional[Path] = typer.Option(None, help=(
        ".npy array (N, 3, H, W) of normalized inputs; default generated.")),
    samples: int = typer.Option(default(VerifyConfig, "samples"), help="Number of generated inputs."),
    seed: int = typer.Option(default(VerifyConfig, "seed"), help="Seed of the generated inputs."),
    rtol: float = typer.Option(default(VerifyConfig, "rtol"), help="max |err| / max |ref| allowed."),
    min_cosine: float = typer.Option(default(VerifyConfig, "min_cosine"), help="Smallest per-sample cosine allowed."),
    min_top1: float = typer.Option(default(VerifyConfig, "min_top1"), help="Smallest top-1 agreement allowed."),
    data: Optional[str] = typer.Option(None, help=(
        "Compare lossy low-precision files on images of this data spec (default: the run's --data; generated inputs "
        "without one).")),
    limit: int = typer.Option(default(VerifyRequest, "limit"), help=(
        "Images from --data the low-precision files are compared on.")),
    min_agreement: float = typer.Option(default(QuantThresholds, "min_agreement"), help=(
        "Lossy low-precision files: smallest top-1 agreement with model.onnx.")),
    min_sqnr: float = typer.Option(default(QuantThresholds, "min_sqnr_db"), help=(
        "Lossy low-precision files: smallest logit SQNR (dB) against model.onnx.")),
    tflite: Optional[Path] = typer.Option(None, help=(
        "Check this .tflite alone (default: the run's model.int8.tflite, with the other files): TensorFlow Lite Micro"
        " against the integer reference, LiteRT and the trained network (docs/tflite.md).")),
    json_out: bool = JsonOpt,
):
    """Compare the ONNX file (onnxruntime, optimizations off and on) with the run's checkpoint
    evaluated in float64, and each low-precision file under its contract: lossless weights
    against the checkpoint at the same tolerance, lossy ones against model.onnx (top-1 agreement,
    SQNR). Exits 3 when a check fails."""
    from wnconvert.models.run.precheck import check_not_busy, check_verify

    req = VerifyRequest(  # the options' own checks first
        onnx_file=onnx_file, precision=value(precision), inputs=inputs, data=data, limit=limit,
        config=VerifyConfig(rtol=rtol, min_cosine=min_cosine, min_top1=min_top1, samples=samples, seed=seed),
        thresholds=QuantThresholds(min_agreement, min_sqnr), tflite=tflite)
    check_not_busy(run_dir)
    check_verify(run_dir, onnx_file, value(precision), tflite)  # before torch, onnx and the model load
    from wnconvert.models.run.run_verify import verify_run
    from wnconvert.models.run.verify_progress import VerifyProgress

    with VerifyProgress(enabled=not json_out) as progress:  # a status line on a terminal's stderr
        out = verify_run(run_dir, req, progress)
    if not out.recorded:
        typer.echo(f"wnconvert: note: {run_dir} is not writable; report.json was not updated", err=True)
    if json_out:
        print_json(out.result)
    else:
        if out.checked_fp32:
            console.print(parity_table(out.result))
        if out.checked_quantized:
            console.print(quantized_table(out.result["quantized"]))
        for name, res in out.result.get("tflite", {}).items():
            console.print(tflite_verify_line(name, res))
    if not out.passed:
        raise ParityError("parity failed: " + "; ".join(out.failures))
