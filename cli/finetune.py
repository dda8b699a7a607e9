"""``wnconvert finetune MODEL``: build, reparametrize, train, fold, export and verify a run.

The run's module (``wnconvert.models.run.run``, which loads torch and torchvision) is imported in the
command's body, the one place it is needed, so ``--help`` and parser errors do not wait for it;
the options' defaults come from the light config modules."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from wnconvert.convert.configs import FoldConfig, SchemeConfig, VerifyConfig
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.names import DEFAULT_TARGET, TRAIN_PLACEMENTS
from wnconvert.models.train.train_config import TrainConfig

from .config_option import ConfigOpt
from .errors import handle_errors
from .options import (
    ActRange,
    Bn,
    Gain,
    Granularity,
    Optimizer,
    Rounding,
    ScaleFormat,
    ScaleGrad,
    Schedule,
    Scheme,
    TrainTarget,
    WdMode,
    WeightRange,
    default,
    given,
    refuse_with_resume,
    value,
)
from .render import JsonOpt, certificate_line, certificate_table, console, parity_line, parity_table, print_json

# finetune --help in panels (cli/help_layout.py), in this order; every option is in one
HELP_PANELS = {
    "Model and weights": ("weights", "num_classes", "image_size", "offline"),
    "Scheme (weights in [-1, 1])": ("scheme", "weight_bits", "weight_range", "gain", "scale_grad", "exclude",
                                    "skip_depthwise"),
    "Quantization (--act-bits)": ("act_bits", "act_range", "scale_format", "rounding", "scale_lr", "freeze_bn_epochs",
                                  "mixed_precision", "target", "no_deploy"),
    "Data": ("data", "limit_train", "limit_val", "download", "gpu_decode", "workers"),
    "Training": ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "wd_mode",
                 "wd_eps", "warmup_epochs", "schedule", "label_smoothing", "grad_clip", "seed", "log_every",
                 "diagnostics"),
    "Device": ("device", "amp", "channels_last", "compile"),
    "Fold, export and verify": ("bn", "granularity", "no_export", "rtol", "samples"),
    "Run directory and output": ("out", "resume", "overwrite", "config", "json_out", "verbose"),
}


# Long only by its option list (one line per option); the body is parsing and one library call.
@handle_errors
def finetune(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="torchvision model name, e.g. resnet50 (see `wnconvert models`)."),
    scheme: Scheme = typer.Option(default(SchemeConfig, "scheme"), help=(
        "Weight-range scheme (see `wnconvert schemes`).")),
    weights: str = typer.Option("DEFAULT", help=(
        "DEFAULT, a torchvision weights name, a .pth/.pt/.safetensors state_dict, or none.")),
    num_classes: Optional[int] = typer.Option(None, help=(
        "Replace the classifier head when it differs from the weights'.")),
    data: Optional[str] = typer.Option(None, help=(
        "imagefolder:PATH | cifar10:PATH | cifar100:PATH | fashion-mnist[:PATH] | synthetic[:K]")),
    epochs: Optional[int] = typer.Option(None, help=(
        "Training epochs (default 5 with --data, 0 without: apply, fold, export, verify only).")),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/MODEL-SCHEME)."),
    gain: Gain = typer.Option(default(SchemeConfig, "gain"), help="none: the raw divide, changes the function."),
    scale_grad: ScaleGrad = typer.Option(default(SchemeConfig, "scale_grad"), help=(
        "Gradient through max/norm (full), or the scale as a constant (detach).")),
    exclude: Optional[List[str]] = typer.Option(None, help=(
        "Leave layers matching this name pattern alone (repeatable).")),
    skip_depthwise: bool = typer.Option(default(SchemeConfig, "skip_depthwise"), help=(
        "Leave depthwise convs unreparametrized.")),
    weight_bits: Optional[int] = typer.Option(None, help=(
        "Fake-quantize N(W) to the symmetric B-bit grid on [-1, 1] during training (2..8; layer-max / channel-max).")),
    weight_range: WeightRange = typer.Option(default(SchemeConfig, "weight_range"), help=(
        "--weight-bits: the grid's range: max (±L on the largest |w|) or learned (a clip learned per channel/layer "
        "from the max).")),
    act_bits: Optional[int] = typer.Option(None, help=(
        "Fake-quantize activations to A bits during training (2..8; needs --weight-bits); export with --precision "
        "int8/int4.")),
    act_range: ActRange = typer.Option("learned", help="Activation ranges after calibration: learned (LSQ) or frozen."),
    freeze_bn_epochs: Optional[int] = typer.Option(None, metavar="K", help=(
        "--act-bits: BatchNorm statistics frozen for the last K epochs (default 1 when --epochs > 1, else 0).")),
    scale_format: ScaleFormat = typer.Option("float", help=(
        "--act-bits: float scales, or po2: every scale a power of two, every requantization a shift (needs --weight-"
        "bits, layer-max/channel-max).")),
    mixed_precision: bool = typer.Option(False, "--mixed-precision", help=(
        "--act-bits: keep hardswish, hardsigmoid, SiLU, sigmoid, GELU, tanh and the squeeze-excite multiply in float "
        "between DequantizeLinear and QuantizeLinear (recorded in report.json) instead of refusing the model.")),
    target: Optional[TrainTarget] = typer.Option(None, help=(
        "--act-bits: the runtime the integer network is trained for: ort-cpu (default: every conv output requantized,"
        " as onnxruntime's integer kernels need) or openvino (a conv read only by a residual add stays float: "
        "OpenVINO fuses the add into it and skips that requantization). Then export --target openvino.")),
    rounding: Rounding = typer.Option("onnx", help=(
        "--act-bits --scale-format po2: the requantization the eval-mode model computes: onnx (round half to even, as"
        " onnxruntime) or tflite (TFLite's double rounding, ADD and MEAN exactly, as TensorFlow Lite Micro; see "
        "docs/tflite-training.md).")),
    bn: Bn = typer.Option(default(FoldConfig, "bn"), help=(
        "keep: absorb scales into BatchNorm | fold: fold BatchNorm into the weights")),
    granularity: Granularity = typer.Option(default(FoldConfig, "granularity"), help=(
        "Scale granularity where the fold re-normalizes.")),
    image_size: Optional[int] = typer.Option(None, help="Input resolution (default: the data's or the weights')."),
    limit_train: Optional[int] = typer.Option(None, help="Use a fixed random subset of N training images."),
    limit_val: Optional[int] = typer.Option(None, help="Use a fixed random subset of N validation images."),
    download: bool = typer.Option(False, help="Let torchvision download CIFAR into the given path."),
    gpu_decode: bool = typer.Option(False, "--gpu-decode", help=(
        "Decode JPEGs and augment on the GPU (nvjpeg); imagefolder data only.")),
    batch_size: int = typer.Option(default(TrainConfig, "batch_size"), help="Per-process batch size."),
    optimizer: Optimizer = typer.Option(default(TrainConfig, "optimizer"), help=(
        "See docs/training.md for why adamw is the default.")),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default per optimizer, see docs/training.md)."),
    momentum: float = typer.Option(default(TrainConfig, "momentum")),
    nesterov: bool = typer.Option(default(TrainConfig, "nesterov")),
    weight_decay: Optional[float] = typer.Option(None, help="Default per optimizer."),
    wd_mode: WdMode = typer.Option(default(TrainConfig, "wd_mode"), help="Weight decay of the reparametrized weights."),
    wd_eps: Optional[float] = typer.Option(None, help="ε of the ε-shifted decay ½λ(‖W‖−ε)²."),
    warmup_epochs: float = typer.Option(default(TrainConfig, "warmup_epochs")),
    schedule: Schedule = typer.Option(default(TrainConfig, "schedule"), help=(
        "After warmup: cosine (to 0) or constant.")),
    label_smoothing: float = typer.Option(default(TrainConfig, "label_smoothing")),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the global gradient norm."),
    scale_lr: float = typer.Option(default(TrainConfig, "scale_lr"), help=(
        "Peak step, in octaves, of the learned scales (activation scales, --weight-range learned): Adam's update "
        "under every optimizer (docs/training.md).")),
    device: str = typer.Option(default(TrainConfig, "device"), help="auto | cpu | cuda | cuda:N"),
    amp: bool = typer.Option(default(TrainConfig, "amp"), help="bf16 autocast on CUDA."),
    channels_last: bool = typer.Option(default(TrainConfig, "channels_last"), help=(
        "channels_last memory format on CUDA.")),
    compile: bool = typer.Option(default(TrainConfig, "compile"), "--compile", help=(
        "torch.compile the training model.")),
    workers: int = typer.Option(default(TrainConfig, "workers"), help="DataLoader worker processes."),
    seed: int = typer.Option(default(TrainConfig, "seed")),
    log_every: int = typer.Option(default(TrainConfig, "log_every"), help=(
        "Steps between step records in metrics.jsonl.")),
    diagnostics: int = typer.Option(default(TrainConfig, "diagnostics"), "--diagnostics", metavar="K", help=(
        "Log per-layer training dynamics to dynamics.jsonl every K steps (0: off); see `wnconvert report`.")),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this directory from its last checkpoint."),
    no_export: bool = typer.Option(False, "--no-export", help="Stop after training: no fold, export or verify."),
    no_deploy: bool = typer.Option(False, "--no-deploy", help=(
        "--act-bits: do not write and check the deployed model.int8.onnx / model.int4.onnx at the end (export "
        "--precision writes it later).")),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=(
        "Print the per-layer fold certificate, the parity tables and every file at the end.")),
    rtol: float = typer.Option(default(VerifyConfig, "rtol"), help="Parity: max |err| / max |ref| allowed."),
    samples: int = typer.Option(default(VerifyConfig, "samples"), help="Parity: number of generated inputs."),
    overwrite: bool = typer.Option(False, help="Replace an existing run in --out."),
    offline: bool = typer.Option(False, "--offline", help=(
        "Never download pretrained weights (also WNCONVERT_OFFLINE=1).")),
    config: Optional[Path] = ConfigOpt,
    json_out: bool = JsonOpt,
):
    """Fine-tune MODEL under a weight-range scheme, then fold, export and verify it."""
    from wnconvert.models.run.run import RunConfig, finetune_torchrun, resume_config, training_epochs
    from wnconvert.models.train.act_run import ActSettings

    if act_bits is None and value(scale_format) == "po2":
        raise UserInputError("--scale-format po2 needs --act-bits A and --weight-bits B: it makes every "
                             "activation and weight scale a power of two")
    if value(rounding) != "onnx" and (act_bits is None or value(scale_format) != "po2"):
        raise UserInputError("--rounding tflite computes TFLite's integer arithmetic exactly on power-of-two "
                             "scales: it needs --act-bits A, --weight-bits B and --scale-format po2")
    if act_bits is None and (freeze_bn_epochs is not None or value(act_range) != "learned" or mixed_precision
                             or target is not None):
        raise UserInputError("--act-range, --freeze-bn-epochs, --mixed-precision and --target apply to --act-bits "
                             "runs only")
    if resume is not None:
        refuse_with_resume(ctx, {"model", "resume", "config", "json_out", "no_deploy", "verbose", "workers"})
        cfg = resume_config(resume)
        if cfg.train is not None and given(ctx, "workers"):  # exact with any workers (models/train/batches.py)
            cfg.train = replace(cfg.train, workers=workers)
            cfg.train.validate()
        if model != cfg.model:
            raise UserInputError(f"{resume} is a {cfg.model} run, not {model}")
    else:
        epochs = training_epochs(epochs, data)
        train = TrainConfig(
            epochs=epochs, batch_size=batch_size, optimizer=value(optimizer), lr=lr, momentum=momentum,
            nesterov=nesterov, weight_decay=weight_decay, wd_mode=value(wd_mode), wd_eps=wd_eps,
            warmup_epochs=warmup_epochs, schedule=value(schedule), label_smoothing=label_smoothing,
            grad_clip=grad_clip, scale_lr=scale_lr, device=device, amp=amp, channels_last=channels_last,
            compile=compile,
            workers=workers, seed=seed, log_every=log_every, diagnostics=diagnostics)
        if epochs == 0:  # convert only: nothing is trained, but a bad training option is still refused
            replace(train, epochs=1).validate()
            train = None
        cfg = RunConfig(
            model=model, out=out or Path("runs") / f"{model}-{value(scheme)}", weights=weights,
            num_classes=num_classes, data=data, image_size=image_size, limit_train=limit_train,
            limit_val=limit_val, download=download, gpu_decode=gpu_decode,
            scheme=SchemeConfig(value(scheme), value(gain), value(scale_grad), tuple(exclude or ()),
                                skip_depthwise, weight_bits=weight_bits, weight_range=value(weight_range)),
            fold=FoldConfig(value(bn), value(granularity)), verify=VerifyConfig(rtol=rtol, samples=samples),
            train=train, no_export=no_export, overwrite=overwrite, offline=offline or None, seed=seed,
            act=ActSettings(act_bits, value(act_range), freeze_bn_epochs, value(scale_format), mixed_precision,
                            TRAIN_PLACEMENTS[value(target) or DEFAULT_TARGET], value(rounding))
            if act_bits is not None else None)
    if no_deploy and cfg.act is None:
        raise UserInputError("--no-deploy applies to --act-bits runs only (they end with their deployed file)")
    cfg.deploy = not no_deploy
    summary = finetune_torchrun(cfg, console=None if json_out else console, resume=resume is not None)
    if summary is None:  # another rank under torchrun: rank 0 reports
        return
    if json_out:
        return print_json({"out": str(summary.out), "manifest": summary.manifest.to_dict(), "report": summary.report})
    _print_summary(summary, verbose)


def _print_summary(summary, verbose: bool = False) -> None:
    """The end of a run at the terminal: what was written, how it did, and what to run next.
    Per-layer tables are one line each (report.json has them; ``--verbose`` prints them)."""
    rep, out = summary.report, summary.out
    if "certificate" in rep:
        if verbose:
            console.print(certificate_table(rep["certificate"], limit=None))
            console.print(parity_table(rep["parity"]))
            if rep.get("parity_vs_original"):
                console.print(parity_table(rep["parity_vs_original"], "Against the original model"))
        else:
            console.print(certificate_line(rep["certificate"]))
            console.print(parity_line(rep["parity"]))
    t = Table(title="Run", show_header=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column()
    t.add_row("run directory", str(out))
    t.add_row("step-0 deviation", f"{rep['step0_rel_deviation']:.2e} (relative, reparametrized vs original)")
    tr = rep.get("training")
    if tr:
        t.add_row("val top-1 before", f"{tr['initial'].get('val_top1', float('nan')):.4f}")
        if tr.get("final"):
            t.add_row("val top-1 after", f"{tr['final']['val_top1']:.4f} (best {tr['best_top1']:.4f}, epoch "
                                         f"{tr['best_epoch']})")
    deployed = rep.get("deployed")
    if rep.get("onnx_accuracy"):
        a = rep["onnx_accuracy"]
        label = "float top-1" if deployed or summary.manifest.act is not None else "ONNX top-1"
        t.add_row(label, f"{a['top1']:.4f} model.onnx on {a['images']} val images (onnxruntime)")
    if deployed:
        a = deployed["onnx_accuracy"]
        t.add_row("deployed top-1", f"{a['top1']:.4f} {deployed['file']} (W{deployed['weight_bits']}"
                  f"A{deployed['act_bits']}) on {a['images']} val images (onnxruntime)")
        t.add_row("deployed check", ("[green]passed[/]" if deployed["passed"] else "[red]FAILED[/]")
                  + f" {deployed['contract']} on {deployed['inputs']}")
    if "stored_max_abs" in rep:
        t.add_row("max |stored weight|", f"{rep['stored_max_abs']:.6f}")
        t.add_row("parity", "[green]passed[/]" if rep["parity"]["passed"] else "[red]FAILED[/]")
    if verbose:
        for name in sorted(summary.manifest.artifacts):
            t.add_row("artifact", str(out / name))
    else:
        files = [n for n in ("model.onnx", deployed and deployed["file"]) if n and n in summary.manifest.artifacts]
        t.add_row("files", ", ".join(files + ["report.json"]) + f" ({len(summary.manifest.artifacts)} in all)")
    console.print(t)
    console.print(f"next: {next_command(summary)}")


def next_command(summary) -> str:
    """The command a user runs next with this run."""
    out, rep, m = summary.out, summary.report, summary.manifest
    if m.no_export:
        return f"wnconvert export {out}   (fold, export and verify model.onnx)"
    if rep.get("deployed"):
        return (f"wnconvert verify {out}   (every file on 256 validation images); for OpenVINO: "
                f"wnconvert export {out} --precision {rep['deployed']['precision']} --target openvino")
    if m.act is not None:
        wbits = m.scheme.weight_bits
        return f"wnconvert export {out} --precision {'int4' if wbits <= 4 else 'int8'}   (the deployed file)"
    return (f"wnconvert export {out} --precision int8   (post-training int8), or wnconvert eval "
            f"{out / 'model.onnx'} --data SPEC")
