"""A run: the job behind ``wnconvert finetune`` (and its resumption). The files it writes are
described in :mod:`wnconvert.models.run.rundir`."""

from __future__ import annotations

import copy
import datetime as _dt
import platform
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from wnconvert.convert.apply import apply_scheme, max_step0_deviation
from wnconvert.convert.artifacts import check_output_dir
from wnconvert.convert.errors import ParityError, UserInputError
from wnconvert.convert.export import ExportConfig
from wnconvert.convert.fold import FoldConfig
from wnconvert.convert.metrics import topk_correct
from wnconvert.convert.pipeline import ConversionResult, convert, require_parity
from wnconvert.convert.runtime import run_onnx
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.convert.verify import VerifyConfig, make_inputs

from ..data.data import DataBundle, Preprocess, build_data, default_preprocess, eval_arrays, parse_data_spec
from ..files import ONNX
from ..train import distributed
from ..train.act_run import ActSettings, act_model, check_act_request, copy_to_float, freeze_bn_hook
from ..train.optim_settings import SCRATCH_DEFAULTS
from ..train.train import TrainConfig, train
from ..zoo.zoo import BuiltModel, build_model, fixed_image_size, min_image_size
from .lock import OUT_ADVICE, check_unlocked
from .run_deploy import deploy_run, deployed_failure
from .rundir import CHECKPOINT, MANIFEST, METRICS, REPORT, Manifest, RunDir  # noqa: F401 (re-exported)

# Beyond these a value is a typo, not a model: the largest torchvision weights take 518 px (ViT-H),
# and one 4096 px image already needs gigabytes of activations in a ResNet-50.
MAX_IMAGE_SIZE = 4096
MAX_CLASSES = 1_000_000


@dataclass
class RunConfig:
    model: str
    out: Path
    weights: str = "DEFAULT"
    num_classes: int | None = None
    data: str | None = None
    image_size: int | None = None
    limit_train: int | None = None
    limit_val: int | None = None
    download: bool = False
    gpu_decode: bool = False         # imagefolder JPEGs decoded and augmented on the GPU
    scheme: SchemeConfig = field(default_factory=SchemeConfig)
    fold: FoldConfig = field(default_factory=FoldConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    train: TrainConfig | None = None  # None for --epochs 0
    act: ActSettings | None = None    # --act-bits: activation QAT (models/train/act_run.py)
    no_export: bool = False
    deploy: bool = True               # --act-bits: write and check the deployed file (models/run/run_deploy.py)
    overwrite: bool = False
    offline: bool | None = None      # None: WNCONVERT_OFFLINE decides whether weights may be downloaded
    seed: int | None = None          # seeds the model's initialisation (None: the training seed, else 0)

    def __post_init__(self) -> None:  # the verify settings check themselves (VerifyConfig)
        if self.num_classes is not None and not 1 <= self.num_classes <= MAX_CLASSES:
            raise UserInputError(f"--num-classes must be between 1 and {MAX_CLASSES}, not {self.num_classes}")
        if self.image_size is not None and not 1 <= self.image_size <= MAX_IMAGE_SIZE:
            raise UserInputError(f"--image-size must be between 1 and {MAX_IMAGE_SIZE}, not {self.image_size}")


@dataclass
class RunSummary:
    out: Path
    manifest: Manifest
    report: dict
    conversion: ConversionResult | None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import onnx
    import onnxruntime
    import torchvision

    try:
        own = version("wnconvert")
    except PackageNotFoundError:
        own = "unknown"
    return {"wnconvert": own, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def resolve_preprocess(cfg: RunConfig, built: BuiltModel) -> Preprocess:
    size = cfg.image_size
    fixed = fixed_image_size(cfg.model)
    if fixed and size and size != fixed:
        raise UserInputError(f"{cfg.model} takes {fixed}x{fixed} inputs only, not --image-size {size}")
    if size and size < min_image_size(cfg.model):
        raise UserInputError(f"{cfg.model} needs --image-size of at least {min_image_size(cfg.model)}")
    size = size or fixed
    if cfg.data:
        return default_preprocess(parse_data_spec(cfg.data), size, built.mean, built.std)
    size = size or built.crop_size or 224
    resize = built.resize_size if (built.crop_size == size and built.resize_size) else round(size * 256 / 224)
    return Preprocess(size, max(resize, size), built.mean, built.std)


def finetune_process(cfg: RunConfig, console=None, resume: bool = False) -> RunSummary:
    """One process's run: build, train, fold, export and verify (:func:`_finetune_locked`); rank 0
    holds the run directory's write lock from its first write to the end. Under torchrun, call
    :func:`finetune_torchrun` instead."""
    with ExitStack() as owner:
        return _finetune_locked(cfg, console, resume, owner)


def _take_over(run: RunDir, cfg: RunConfig, resume: bool) -> None:
    """Holding the lock: refuse a run that is there without --resume/--overwrite (unless it is an
    abandoned stub); --overwrite (or a stub) clears the old run first, so nothing of it is mixed in."""
    if resume or not run.exists():
        return
    if not (cfg.overwrite or run.abandoned(held=True)):
        raise UserInputError(f"{run.path} already holds a run; use --resume to continue it, "
                             "--overwrite to replace it, or another --out")
    run.clear()


def _finetune_locked(cfg: RunConfig, console, resume: bool, owner: ExitStack) -> RunSummary:
    """The steps of :func:`finetune_process`; the write lock, once taken, lives in ``owner``."""
    out = check_output_dir(cfg.out)
    if cfg.train is not None:  # bad settings fail before anything is built or written
        cfg.train.validate()
    check_act_request(cfg.scheme, cfg.act, data=cfg.data, gpu_decode=cfg.gpu_decode,
                      epochs=cfg.train.epochs if cfg.train is not None else 0)
    if (out / MANIFEST).exists() and not (resume or cfg.overwrite or RunDir(out).abandoned()):
        check_unlocked(out)  # a run in progress: name its process
        raise UserInputError(f"{out} already holds a run; use --resume to continue it, "
                             "--overwrite to replace it, or another --out")
    if out.is_dir():  # --overwrite/--resume of a run in progress: said before any model or data loads
        check_unlocked(out, "" if resume else OUT_ADVICE)
    built, data = _model_and_data(cfg, resume)
    preprocess = resolve_preprocess(cfg, built)
    if cfg.train is not None and built.weights == "none" and not resume:
        cfg.train = from_scratch_defaults(cfg.train)
    model = built.model.eval()
    shape = (3, preprocess.image_size, preprocess.image_size)
    original = copy.deepcopy(model)
    apply_report = apply_scheme(model, cfg.scheme)
    with torch.no_grad():
        x = make_inputs(shape, cfg.verify)
        step0 = max_step0_deviation(original(x), model(x))
    qat = act_model(model, cfg.act, data, cfg.train, resume)  # None without --act-bits

    rank = distributed.info()
    run = RunDir(out)
    if rank.is_main:
        owner.enter_context(run.writing(create=True))
        _take_over(run, cfg, resume)
    manifest = Manifest(
        model=cfg.model, num_classes=built.num_classes, preprocess=preprocess, weights=built.weights,
        data=cfg.data, limit_train=cfg.limit_train, limit_val=cfg.limit_val,
        gpu_decode=cfg.gpu_decode, scheme=cfg.scheme, fold=cfg.fold, export=cfg.export,
        verify=cfg.verify, train=cfg.train, no_export=cfg.no_export, act=cfg.act,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), versions=versions())
    if rank.is_main:
        run.write_manifest(manifest)
        run.metrics_path.touch()  # every run directory has one; empty when nothing was trained
    report: dict = {"apply": apply_report.to_dict(), "step0_rel_deviation": step0}

    if cfg.train is not None and getattr(cfg.train, "epochs", 0) > 0:
        hook = freeze_bn_hook(qat, cfg.act, cfg.train.epochs) if qat is not None else None
        result = train(qat if qat is not None else model, data, cfg.train, out, resume=resume,
                       console=console if rank.is_main else None, on_epoch=hook)
        report["training"] = {"initial": result.initial, "best_top1": result.best_top1,
                              "best_epoch": result.best_epoch,
                              "final": asdict(result.history[-1]) if result.history else None}
    if not rank.is_main:  # under torchrun, rank 0 alone writes and converts
        return RunSummary(out, manifest, report, None)
    model = model.cpu().eval()
    run.save_model_state(qat.cpu().eval() if qat is not None else model)
    if qat is not None:
        copy_to_float(qat, model)  # model.onnx of an --act-bits run is its float network

    conversion = None
    if not cfg.no_export:
        conversion = convert(model, shape, out / ONNX, fold_config=cfg.fold, export_config=cfg.export,
                             verify_config=cfg.verify,
                             original=original if cfg.train is None else None)
        report.update(conversion.to_dict())
        if data is not None:
            report["onnx_accuracy"] = onnx_accuracy(out / ONNX, cfg.data, preprocess, cfg.limit_val)
    run.write_report(report)  # a new (or resumed) run starts its report afresh
    run.finish(manifest)
    if conversion is not None:
        require_parity(conversion)
        if cfg.act is not None and cfg.deploy:  # the file the run trained for, written and checked
            deployed = deploy_run(run, preprocess, cfg.limit_val, cfg.verify.samples)
            manifest, report = run.manifest(), run.report()
            if not deployed["passed"]:
                raise ParityError(deployed_failure(deployed))
    return RunSummary(out, manifest, report, conversion)


def _model_and_data(cfg: RunConfig, resume: bool) -> tuple[BuiltModel, DataBundle | None]:
    """The model (its head sized to the data's classes unless --num-classes says otherwise) and,
    when the run trains or measures accuracy, the data."""
    weights = cfg.weights if not resume else "none"
    seed = cfg.seed if cfg.seed is not None else (cfg.train.seed if cfg.train is not None else 0)
    torch.manual_seed(seed)  # a fresh head (or --weights none) is initialised from the seed
    built = build_model(cfg.model, weights, cfg.num_classes, offline=cfg.offline)
    if not cfg.data or (cfg.train is None and cfg.no_export):
        return built, None
    data = build_data(cfg.data, resolve_preprocess(cfg, built), limit_train=cfg.limit_train,
                      limit_val=cfg.limit_val, download=cfg.download, gpu_decode=cfg.gpu_decode)
    if data.num_classes != built.num_classes:
        if cfg.num_classes:
            raise UserInputError(f"--num-classes {cfg.num_classes} does not match the "
                                 f"{data.num_classes} classes of {cfg.data}")
        built = build_model(cfg.model, weights, data.num_classes, offline=cfg.offline)
    return built, data


def finetune_torchrun(cfg: RunConfig, console=None, resume: bool = False) -> RunSummary | None:
    """:func:`finetune_process`, under torchrun on every rank (a plain call outside it); the summary
    on rank 0, None on the others."""
    rank = distributed.init_distributed()  # a no-op outside torchrun
    try:
        summary = finetune_process(cfg, console=console, resume=resume)
    finally:
        distributed.cleanup()
    return summary if rank.is_main else None


def from_scratch_defaults(train_cfg):
    """Fill an unset lr / weight decay with the from-scratch defaults (docs/training.md)."""
    d = SCRATCH_DEFAULTS.get(train_cfg.optimizer)
    if d is None:
        return train_cfg
    return replace(train_cfg, lr=d.lr if train_cfg.lr is None else train_cfg.lr,
                   weight_decay=d.weight_decay if train_cfg.weight_decay is None else train_cfg.weight_decay)


def onnx_accuracy(path: Path, data: str, preprocess: Preprocess, limit: int | None,
                  batch: int = 256) -> dict:
    """Top-1/top-5 of an ONNX file in onnxruntime on the validation split, fed with ``preprocess``."""
    images, labels = eval_arrays(data, preprocess, limit=limit)
    top1, top5 = topk_correct(run_onnx(path, images, batch=batch), labels)
    n = max(len(images), 1)
    return {"images": len(images), "top1": top1 / n, "top5": top5 / n}


# -- loading a run directory back ---------------------------------------------------------------

def load_manifest(run_dir: Path) -> Manifest:
    return RunDir(run_dir).manifest()


def load_run(run_dir: Path) -> tuple[Manifest, nn.Module, Preprocess]:
    """The manifest, the reparametrized model with its checkpoint loaded, and its preprocessing."""
    return RunDir(run_dir).load()


def resume_config(run_dir: Path) -> RunConfig:
    """The configuration that continues the training run in ``run_dir`` from its last checkpoint."""
    m = load_manifest(run_dir)
    if m.train is None:
        raise UserInputError(f"{run_dir} was not a training run; nothing to resume")
    return RunConfig(
        model=m.model, out=Path(run_dir), weights="none", num_classes=m.num_classes, data=m.data,
        image_size=m.preprocess.image_size, limit_train=m.limit_train, limit_val=m.limit_val,
        gpu_decode=m.gpu_decode, scheme=m.scheme, fold=m.fold, export=m.export, verify=m.verify,
        train=m.train, no_export=m.no_export, act=m.act)


def training_epochs(epochs: int | None, data: str | None) -> int:
    """``--epochs``: 5 with data and 0 (convert only) without, unless given; training needs data."""
    epochs = (5 if data else 0) if epochs is None else epochs
    if epochs < 0:
        raise UserInputError("--epochs must be >= 0")
    if epochs > 0 and not data:
        raise UserInputError("training needs --data (or use --epochs 0 to convert only)")
    return epochs
