"""``wnconvert``: thin Typer commands over ``wnconvert.convert`` and ``wnconvert.models``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from wnconvert.convert.errors import ParityError, RangeError, UserInputError

from .config_option import ConfigOpt
from .errors import handle_errors, run_app
from .render import (certificate_table, console, parity_table, print_json, quantized_table,
                     ranges_table)

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Fine-tune torchvision models with every conv/linear weight in [-1, 1], fold the "
         "reparametrization, export ONNX and prove it computes what the trained model does.")

JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")


def _scheme_config(scheme, gain, scale_grad, exclude, skip_depthwise, weight_bits=None):
    from wnconvert.convert.schemes import SchemeConfig
    return SchemeConfig(scheme, gain, scale_grad, tuple(exclude or ()), skip_depthwise,
                        weight_bits=weight_bits)


def _verify_config(rtol, samples, min_top1=1.0):
    from wnconvert.convert.verify import VerifyConfig
    if samples < 1:
        raise UserInputError("--samples must be at least 1")
    return VerifyConfig(rtol=rtol, samples=samples, min_top1=min_top1)


@app.command()
@handle_errors
def finetune(
    model: str = typer.Argument(..., help="torchvision model name, e.g. resnet50 (see `wnconvert models`)."),
    scheme: str = typer.Option("layer-max", help="layer-max | channel-max | weight-std | weight-norm | none"),
    weights: str = typer.Option("DEFAULT", help="DEFAULT, a torchvision weights name, a .pth/.pt/.safetensors state_dict, or none."),
    num_classes: Optional[int] = typer.Option(None, help="Replace the classifier head when it differs from the weights'."),
    data: Optional[str] = typer.Option(None, help="imagefolder:PATH | cifar10:PATH | cifar100:PATH | fashion-mnist[:PATH] | synthetic[:K]"),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default 5 with --data, 0 without: apply, fold, export, verify only)."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/MODEL-SCHEME)."),
    gain: str = typer.Option("frozen", help="frozen | learned | none (none: the raw divide, changes the function)"),
    scale_grad: str = typer.Option("full", help="full | detach: gradient through max/norm, or scale as a constant"),
    exclude: Optional[List[str]] = typer.Option(None, help="Leave layers matching this name pattern alone (repeatable)."),
    skip_depthwise: bool = typer.Option(False, help="Leave depthwise convs unreparametrized."),
    weight_bits: Optional[int] = typer.Option(None, help="Fake-quantize N(W) to the symmetric B-bit grid on [-1, 1] during training (2..8; layer-max / channel-max)."),
    bn: str = typer.Option("keep", help="keep: absorb scales into BatchNorm | fold: fold BatchNorm into the weights"),
    granularity: str = typer.Option("tensor", help="tensor | channel: scale granularity where the fold re-normalizes"),
    image_size: Optional[int] = typer.Option(None, help="Input resolution (default: the data's or the weights')."),
    limit_train: Optional[int] = typer.Option(None, help="Use a fixed random subset of N training images."),
    limit_val: Optional[int] = typer.Option(None, help="Use a fixed random subset of N validation images."),
    download: bool = typer.Option(False, help="Let torchvision download CIFAR into the given path."),
    gpu_decode: bool = typer.Option(False, "--gpu-decode", help="Decode JPEGs and augment on the GPU (nvjpeg); imagefolder data only."),
    batch_size: int = typer.Option(128, help="Per-process batch size."),
    optimizer: str = typer.Option("adamw", help="adamw | sgd | lars (see docs/training.md for why adamw is the default)"),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default per optimizer, see docs/training.md)."),
    momentum: float = typer.Option(0.9),
    nesterov: bool = typer.Option(False),
    weight_decay: Optional[float] = typer.Option(None, help="Default per optimizer."),
    wd_mode: str = typer.Option("l2", help="l2 | eps-shifted | none, for reparametrized weights"),
    wd_eps: Optional[float] = typer.Option(None, help="ε of the ε-shifted decay ½λ(‖W‖−ε)²."),
    warmup_epochs: float = typer.Option(0.0),
    schedule: str = typer.Option("cosine", help="After warmup: cosine (to 0) | constant"),
    label_smoothing: float = typer.Option(0.0),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the global gradient norm."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    amp: bool = typer.Option(True, help="bf16 autocast on CUDA."),
    channels_last: bool = typer.Option(True, help="channels_last memory format on CUDA."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the training model."),
    workers: int = typer.Option(2, help="DataLoader worker processes."),
    seed: int = typer.Option(0),
    log_every: int = typer.Option(50, help="Steps between step records in metrics.jsonl."),
    diagnostics: int = typer.Option(0, "--diagnostics", metavar="K", help="Log per-layer training dynamics to dynamics.jsonl every K steps (0: off); see `wnconvert report`."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this directory from its last checkpoint."),
    no_export: bool = typer.Option(False, "--no-export", help="Stop after training: no fold, export or verify."),
    rtol: float = typer.Option(1e-4, help="Parity: max |err| / max |ref| allowed."),
    samples: int = typer.Option(8, help="Parity: number of generated inputs."),
    overwrite: bool = typer.Option(False, help="Replace an existing run in --out."),
    config: Optional[Path] = ConfigOpt,
    json_out: bool = JsonOpt,
):
    """Fine-tune MODEL under a weight-range scheme, then fold, export and verify it."""
    from wnconvert.convert.fold import FoldConfig
    from wnconvert.models.run import RunConfig, load_manifest, run_finetune

    if resume is not None:
        manifest = load_manifest(resume)
        cfg = _resume_config(manifest, resume)
    else:
        epochs = (5 if data else 0) if epochs is None else epochs
        if epochs < 0:
            raise UserInputError("--epochs must be >= 0")
        if epochs > 0 and not data:
            raise UserInputError("training needs --data (or use --epochs 0 to convert only)")
        train_cfg = None
        if epochs > 0:
            from wnconvert.models.train import TrainConfig
            train_cfg = TrainConfig(
                epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum,
                nesterov=nesterov, weight_decay=weight_decay, wd_mode=wd_mode, wd_eps=wd_eps,
                warmup_epochs=warmup_epochs, schedule=schedule, label_smoothing=label_smoothing,
                grad_clip=grad_clip, device=device, amp=amp, channels_last=channels_last, compile=compile,
                workers=workers, seed=seed, log_every=log_every, diagnostics=diagnostics)
        cfg = RunConfig(
            model=model, out=out or Path("runs") / f"{model}-{scheme}", weights=weights,
            num_classes=num_classes, data=data, image_size=image_size, limit_train=limit_train,
            limit_val=limit_val, download=download, gpu_decode=gpu_decode,
            scheme=_scheme_config(scheme, gain, scale_grad, exclude, skip_depthwise, weight_bits),
            fold=FoldConfig(bn, granularity), verify=_verify_config(rtol, samples),
            train=train_cfg, no_export=no_export, overwrite=overwrite)
    from wnconvert.models import distributed
    rank = distributed.init_distributed()  # a no-op outside torchrun
    try:
        summary = run_finetune(cfg, console=None if json_out else console, resume=resume is not None)
    finally:
        distributed.cleanup()
    if not rank.is_main:
        return
    if json_out:
        print_json({"out": str(summary.out), "manifest": summary.manifest, "report": summary.report})
        return
    _print_summary(summary)


def _resume_config(manifest: dict, run_dir: Path):
    from wnconvert.convert.export import ExportConfig
    from wnconvert.convert.fold import FoldConfig
    from wnconvert.convert.schemes import SchemeConfig
    from wnconvert.convert.verify import VerifyConfig
    from wnconvert.models.run import RunConfig
    from wnconvert.models.train import TrainConfig

    if not manifest.get("train"):
        raise UserInputError(f"{run_dir} was not a training run; nothing to resume")
    s = dict(manifest["scheme"])
    s["exclude"] = tuple(s.get("exclude", ()))
    return RunConfig(
        model=manifest["model"], out=Path(run_dir), weights="none",
        num_classes=manifest["num_classes"], data=manifest["data"],
        image_size=manifest["preprocess"]["image_size"], limit_train=manifest.get("limit_train"),
        limit_val=manifest.get("limit_val"), gpu_decode=manifest.get("gpu_decode", False),
        scheme=SchemeConfig(**s),
        fold=FoldConfig(**manifest["fold"]), export=ExportConfig(**manifest["export"]),
        verify=VerifyConfig(**manifest["verify"]), train=TrainConfig(**manifest["train"]))


def _print_summary(summary) -> None:
    rep = summary.report
    if "certificate" in rep:
        console.print(certificate_table(rep["certificate"], limit=12))
        console.print(parity_table(rep["parity"]))
        if rep.get("parity_vs_original"):
            console.print(parity_table(rep["parity_vs_original"], "Against the original model"))
    t = Table(title="Run", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("run directory", str(summary.out))
    t.add_row("step-0 deviation", f"{rep['step0_rel_deviation']:.2e} (relative, reparametrized vs original)")
    tr = rep.get("training")
    if tr:
        t.add_row("val top-1 before", f"{tr['initial'].get('val_top1', float('nan')):.4f}")
        if tr.get("final"):
            t.add_row("val top-1 after", f"{tr['final']['val_top1']:.4f} (best {tr['best_top1']:.4f}, epoch {tr['best_epoch']})")
    if rep.get("onnx_accuracy"):
        a = rep["onnx_accuracy"]
        t.add_row("ONNX top-1", f"{a['top1']:.4f} on {a['images']} val images (onnxruntime)")
    if "stored_max_abs" in rep:
        t.add_row("max |stored weight|", f"{rep['stored_max_abs']:.6f}")
        t.add_row("parity", "[green]passed[/]" if rep["parity"]["passed"] else "[red]FAILED[/]")
    for name in sorted(summary.manifest.get("artifacts", {})):
        t.add_row("artifact", str(summary.out / name))
    console.print(t)


def _run_dir_model(run_dir: Path):
    from wnconvert.models.run import load_run
    return load_run(run_dir)


def _fold_config(manifest: dict, bn: Optional[str], granularity: Optional[str]):
    """The run's fold settings, with the command line's overrides."""
    from wnconvert.convert.fold import FoldConfig
    return FoldConfig(bn or manifest["fold"]["bn"], granularity or manifest["fold"]["granularity"])


@app.command()
@handle_errors
def fold(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    bn: Optional[str] = typer.Option(None, help="keep | fold (default: the run's)"),
    granularity: Optional[str] = typer.Option(None, help="tensor | channel (default: the run's)"),
    json_out: bool = JsonOpt,
):
    """Fold the run's checkpoint into static weights and print the per-layer certificate."""
    from wnconvert.convert.fold import fold_model
    from wnconvert.convert.pipeline import example_inputs

    manifest, model, pre = _run_dir_model(run_dir)
    cfg = _fold_config(manifest, bn, granularity)
    result = fold_model(model, example_inputs((3, pre.image_size, pre.image_size)), cfg)
    cert = result.certificate()
    if json_out:
        print_json({"fold": asdict(cfg), "certificate": cert, "stored_max_abs": result.max_stored})
        return
    console.print(certificate_table(cert, limit=None))
    console.print(f"max |stored weight| = {result.max_stored:.6f}, worst layer rel. diff = {result.max_rel_diff:.2e}")


@app.command()
@handle_errors
def export(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    bn: Optional[str] = typer.Option(None, help="keep | fold (default: the run's)"),
    granularity: Optional[str] = typer.Option(None, help="tensor | channel (default: the run's)"),
    opset: Optional[int] = typer.Option(None, help="ONNX opset (default: the run's)."),
    rtol: Optional[float] = typer.Option(None, help="Parity tolerance (default: the run's)."),
    precision: str = typer.Option("fp32", help="fp32 (model.onnx) | fp16 | int8 | int4: writes model.PRECISION.onnx from model.onnx."),
    data: Optional[str] = typer.Option(None, help="Calibration data spec (needed for int8 activations)."),
    calib_samples: int = typer.Option(256, help="Calibration images taken from --data."),
    calib_split: str = typer.Option("train", help="train | val: the split of --data calibration images come from (comparisons with model.onnx use val)."),
    act_bits: Optional[str] = typer.Option(None, help="8 | float: activations of int8/int4 files (default: 8 for int8, float for int4)."),
    per_channel: Optional[bool] = typer.Option(None, "--per-channel/--per-tensor", help="Weight scales (default: per channel, except per tensor for layer-max weights-only files)."),
    calibrate_method: str = typer.Option("minmax", help="minmax | percentile | entropy"),
    act_type: str = typer.Option("uint8", help="uint8 | int8: type of quantized activations (uint8 is onnxruntime's fast CPU path)."),
    fuse: Optional[bool] = typer.Option(None, "--fuse/--no-fuse", help="Fold BatchNorm and scales into Conv before quantizing activations (default: yes; a --weight-bits run's grid stays exact, per channel)."),
    json_out: bool = JsonOpt,
):
    """Fold the run's checkpoint, write RUN_DIR/model.onnx, check weight ranges and parity.
    With --precision fp16|int8|int4: write RUN_DIR/model.PRECISION.onnx from model.onnx instead."""
    if precision != "fp32":
        from .quant import export_precision
        from wnconvert.convert.quantize import check_precision
        check_precision(precision)
        entry = export_precision(run_dir, precision, data=data, calib_samples=calib_samples,
                                 act_bits=act_bits, per_channel=per_channel,
                                 calibrate_method=calibrate_method, rtol=rtol, calib_split=calib_split,
                                 act_type=act_type, fuse=fuse)
        if json_out:
            print_json(entry)
        else:
            c = entry["vs_fp32"]
            console.print(f"wrote {run_dir / entry['file']} ({entry['activations']} activations, "
                          f"weights {entry['weight_storage'] or 'fp16'}): top-1 agreement "
                          f"{c['top1_agreement']:.4f}, cosine {c['cosine_min']:.6f}, SQNR {c['sqnr_db']:.1f} dB")
        return
    from wnconvert.convert.quantize import check_precision
    check_precision(precision)
    from wnconvert.convert.export import ExportConfig
    from wnconvert.convert.pipeline import convert, require_parity
    from wnconvert.convert.verify import VerifyConfig
    from wnconvert.models.run import REPORT, finish_manifest
    from wnconvert.convert.artifacts import read_json, write_json

    manifest, model, pre = _run_dir_model(run_dir)
    fold_cfg = _fold_config(manifest, bn, granularity)
    exp = dict(manifest["export"])
    if opset:
        exp["opset"] = opset
    ver = dict(manifest["verify"])
    if rtol is not None:
        ver["rtol"] = rtol
    result = convert(model, (3, pre.image_size, pre.image_size), run_dir, fold_config=fold_cfg,
                     export_config=ExportConfig(**exp), verify_config=VerifyConfig(**ver))
    report = read_json(run_dir / REPORT) if (run_dir / REPORT).exists() else {}
    report.update(result.to_dict())
    write_json(run_dir / REPORT, report)
    manifest.update(fold=asdict(fold_cfg), export=exp, verify=ver)
    finish_manifest(run_dir, manifest)
    if json_out:
        print_json(result.to_dict())
    else:
        console.print(parity_table(result.to_dict()["parity"]))
        console.print(f"wrote {result.onnx_path} ({result.onnx_weights} weight tensors, max |w| = {result.onnx_max_abs:.6f})")
    require_parity(result)


@app.command()
@handle_errors
def verify(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    onnx_file: Optional[Path] = typer.Option(None, "--onnx", help="ONNX file (default RUN_DIR/model.onnx and every model.<precision>.onnx)."),
    precision: Optional[str] = typer.Option(None, help="Check only RUN_DIR's model.onnx (fp32) or model.<precision>.onnx (fp16 | int8 | int4)."),
    inputs: Optional[Path] = typer.Option(None, help=".npy array (N, 3, H, W) of normalized inputs; default generated."),
    samples: int = typer.Option(8, help="Number of generated inputs."),
    seed: int = typer.Option(0, help="Seed of the generated inputs."),
    rtol: float = typer.Option(1e-4, help="max |err| / max |ref| allowed."),
    min_cosine: float = typer.Option(0.99999, help="Smallest per-sample cosine allowed."),
    min_top1: float = typer.Option(1.0, help="Smallest top-1 agreement allowed."),
    data: Optional[str] = typer.Option(None, help="Compare lossy low-precision files on images of this data spec (default: the run's --data; generated inputs without one)."),
    limit: int = typer.Option(256, help="Images from --data for lossy low-precision files."),
    min_agreement: float = typer.Option(0.9, help="Lossy low-precision files: smallest top-1 agreement with model.onnx."),
    min_sqnr: float = typer.Option(10.0, help="Lossy low-precision files: smallest logit SQNR (dB) against model.onnx."),
    json_out: bool = JsonOpt,
):
    """Compare the ONNX file (onnxruntime, optimizations off and on) with the run's checkpoint
    evaluated in float64, and each low-precision file under its contract: lossless weights
    against the checkpoint at the same tolerance, lossy ones against model.onnx (top-1 agreement,
    SQNR). Exits 3 when a check fails."""
    from wnconvert.convert.artifacts import read_json, write_json
    from wnconvert.convert.quant_check import QuantThresholds
    from wnconvert.convert.verify import VerifyConfig, load_inputs, make_inputs, verify as run_verify
    from wnconvert.models.run import REPORT

    from .quant import data_arrays, verify_quantized, verify_targets

    manifest, model, pre = _run_dir_model(run_dir)
    thresholds = QuantThresholds(min_agreement, min_sqnr)
    targets = verify_targets(run_dir, onnx_file, precision)
    cfg = VerifyConfig(rtol=rtol, min_cosine=min_cosine, min_top1=min_top1, samples=samples, seed=seed)
    shape = (3, pre.image_size, pre.image_size)
    x = load_inputs(inputs, shape) if inputs else make_inputs(shape, cfg)
    inputs_name = str(inputs) if inputs else f"{len(x)} generated samples, seed {seed}"
    d: dict = {}
    passed, failures = True, []
    fp32 = [p for prec, p in targets if prec == "fp32"]
    if fp32:
        report = run_verify(model, x, onnx_path=fp32[0], config=cfg, inputs_name=inputs_name)
        d = report.to_dict()
        passed, failures = report.passed, report.failures()
    low = [(prec, p) for prec, p in targets if prec != "fp32"]
    if low:
        spec = data or (manifest.get("data") if not inputs else None)
        if spec:
            xq = data_arrays(spec, pre, limit)
            q_inputs = f"{len(xq)} images from {spec}"
        else:
            xq, q_inputs = x.numpy(), inputs_name
        d["quantized"] = verify_quantized(run_dir, model, low, x, cfg, xq, q_inputs, thresholds)
        for name, res in d["quantized"].items():
            passed = passed and res["passed"]
            failures += [f"{name}: {f}" for f in res["failures"]]
        d["passed"] = passed
    if (run_dir / REPORT).exists():
        full = read_json(run_dir / REPORT)
        full["verify"] = d
        write_json(run_dir / REPORT, full)
    if json_out:
        print_json(d)
    else:
        if fp32:
            console.print(parity_table(d))
        if low:
            console.print(quantized_table(d["quantized"]))
    if not passed:
        raise ParityError("parity failed: " + "; ".join(failures))


@app.command()
@handle_errors
def inspect(
    path: Path = typer.Argument(..., help="An .onnx file, a state_dict (.pth/.pt/.safetensors) or a run directory."),
    require_unit_range: bool = typer.Option(False, help="Exit 4 when any weight lies outside [-1, 1]."),
    json_out: bool = JsonOpt,
):
    """Per-layer weight ranges. For a run directory, its model.onnx."""
    from wnconvert.convert.inspect import inspect_file
    from wnconvert.models.zoo import load_state_file

    if path.is_dir():
        path = path / "model.onnx"
    rows = inspect_file(path, load_state_file)
    bad = [r for r in rows if not r["in_unit_range"]]
    if json_out:
        print_json({"path": str(path), "tensors": rows, "outside_unit_range": len(bad)})
    else:
        console.print(ranges_table(rows, f"Weight ranges of {path}", limit=None))
        console.print(f"{len(rows)} weight tensors, {len(bad)} outside [-1, 1]")
    if require_unit_range and bad:
        worst = max(bad, key=lambda r: r["max_abs"])
        raise RangeError(f"{len(bad)} weight tensor(s) outside [-1, 1] in {path} "
                         f"(worst {worst['name']}: max|w|={worst['max_abs']:.6g})")


@app.command()
@handle_errors
def schemes(json_out: bool = JsonOpt):
    """List the weight-range schemes."""
    from wnconvert.convert.schemes import SCHEME_HELP
    if json_out:
        print_json(SCHEME_HELP)
        return
    t = Table(title="Schemes")
    t.add_column("scheme")
    t.add_column("normalization")
    for k, v in SCHEME_HELP.items():
        t.add_row(k, v)
    console.print(t)


@app.command()
@handle_errors
def models(json_out: bool = JsonOpt):
    """List the torchvision classification models."""
    from wnconvert.models.zoo import list_models
    names = list_models()
    if json_out:
        print_json(names)
        return
    console.print(", ".join(names))
    console.print(f"{len(names)} models")


from .report_cmd import report as _report_command  # noqa: E402  (heavy imports happen inside)

app.command(name="report")(_report_command)


from .quant import eval_command as _eval_command  # noqa: E402

app.command(name="eval")(_eval_command)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
