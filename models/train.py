"""Fine-tuning loop: single process or torchrun/DDP, CPU or CUDA, resumable.

``train(model, data, config, run_dir)`` trains the caller's model object in place and returns a
:class:`TrainResult`. Outputs under ``run_dir`` (written by rank 0 only):

* ``metrics.jsonl``: a record every ``log_every`` steps ``{"step", "epoch", "loss", "lr",
  "images_per_s"}`` and one per epoch ``{"epoch", "train_loss", "val_loss", "val_top1",
  "val_top5", "lr", "images_per_s"}`` (accuracies as fractions); appended and flushed per line.
* ``train/last.pt`` after every epoch, ``train/best.pt`` whenever val top-1 improves
  (see :mod:`.checkpoint`).

Epochs are numbered from 1; ``step`` counts optimizer steps over the whole run. Resuming from an
epoch-end ``last.pt`` reproduces the uninterrupted run exactly on the same hardware and number of
processes (data order, schedule, optimizer and RNG state are all restored). A Ctrl-C mid-epoch
saves the current state; resuming from it skips the batches already seen, with the same data
order, but random augmentations of the remaining batches may differ from an uninterrupted run.
"""

from __future__ import annotations

import gc
import itertools
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..convert.errors import TrainingError, UserInputError
from . import checkpoint as ckpt
from . import distributed as dist_utils
from .batches import (EpochSampler, autocast, collate, device_batches_of, evaluate_loader, logits,
                      make_val_loader)
from .batches import evaluate
from .progress import MetricsLog, Progress
from .optim import OPTIMIZERS, SCHEDULES, WD_MODES, build_optimizer, resolve_defaults, warmup_cosine

__all__ = ["TrainConfig", "EpochMetrics", "TrainResult", "train", "evaluate"]

DEVICES = ("auto", "cpu", "cuda")
# Fields that shape the optimization trajectory: a resumed run must use the same values.
_TRAJECTORY_FIELDS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov",
                      "weight_decay", "wd_mode", "wd_eps", "warmup_epochs", "schedule", "label_smoothing",
                      "grad_clip", "seed")


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 128             # per process; the global batch is batch_size * world size
    optimizer: str = "adamw"          # sgd | adamw | lars (docs/training.md: why adamw)
    lr: float | None = None           # None -> models.optim.DEFAULTS[optimizer].lr
    momentum: float = 0.9             # SGD/LARS momentum; AdamW beta1
    nesterov: bool = False
    weight_decay: float | None = None  # None -> models.optim.DEFAULTS[optimizer].weight_decay
    wd_mode: str = "l2"               # decay of raw reparametrized weights: l2 | eps-shifted | none
    wd_eps: float | None = None       # None -> models.optim.DEFAULT_WD_EPS
    warmup_epochs: float = 0.0        # linear warmup, then the schedule, stepped per iteration
    schedule: str = "cosine"          # after warmup: cosine to 0 | constant
    label_smoothing: float = 0.0
    grad_clip: float | None = None    # max global grad norm
    device: str = "auto"              # auto | cpu | cuda
    amp: bool = True                  # bf16 autocast, CUDA only
    channels_last: bool = True        # CUDA only
    compile: bool = False
    workers: int = 2
    seed: int = 0
    log_every: int = 50               # steps between step records in metrics.jsonl; 0 = none
    diagnostics: int = 0              # steps between dynamics.jsonl records (models/diagnostics.py); 0 = off

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self) -> "TrainConfig":
        """A copy with ``None`` defaults (lr, weight_decay, wd_eps) filled in, after validation."""
        self.validate()
        lr, wd, eps = resolve_defaults(self.optimizer, self.lr, self.weight_decay, self.wd_eps)
        return TrainConfig(**{**self.to_dict(), "lr": lr, "weight_decay": wd, "wd_eps": eps})

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise UserInputError(msg)

        if self.optimizer not in OPTIMIZERS:
            bad(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            bad(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if self.wd_mode not in WD_MODES:
            bad(f"unknown wd mode {self.wd_mode!r}; choose one of: {', '.join(WD_MODES)}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            bad(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")
        if self.epochs < 1:
            bad(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            bad(f"batch size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            bad(f"workers must be >= 0, got {self.workers}")
        if self.log_every < 0:
            bad(f"log_every must be >= 0, got {self.log_every}")
        if self.diagnostics < 0:
            bad(f"diagnostics must be >= 0, got {self.diagnostics}")
        if not (0 <= self.warmup_epochs <= self.epochs):
            bad(f"warmup epochs must be between 0 and epochs ({self.epochs}), got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            bad(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            bad(f"grad clip must be > 0, got {self.grad_clip}")


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float
    val_top1: float
    val_top5: float
    lr: float
    images_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    history: list[EpochMetrics]
    best_top1: float
    best_epoch: int
    initial: dict  # {"val_top1", "val_top5", "val_loss"} before training
    interrupted: bool = False  # always False on return: an interrupt raises TrainingError


class _NonFinite(Exception):
    pass


def _pick_device(name: str, d: dist_utils.DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserInputError(f"device {name!r} requested but no CUDA device is available")
        if name == "cuda":
            idx = d.local_rank % torch.cuda.device_count() if d.enabled else torch.cuda.current_device()
            return torch.device("cuda", idx)
        return torch.device(name)
    if d.enabled and torch.distributed.get_backend() == "nccl":
        raise UserInputError("the nccl process group needs --device cuda")
    return torch.device("cpu")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _model_device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


# -- training ----------------------------------------------------------------------------------

@dataclass
class _State:
    """Everything that advances during training and goes into checkpoints."""

    epoch: int = 0                    # completed epochs
    step: int = 0                     # optimizer steps so far
    best_top1: float = -1.0
    best_epoch: int = 0
    history: list[EpochMetrics] = field(default_factory=list)
    initial: dict = field(default_factory=dict)
    # inside the running epoch (what a mid-epoch checkpoint needs)
    in_epoch: bool = False
    batches: int = 0
    loss_sum: float = 0.0
    images: int = 0
    last_lr: float = 0.0
    epoch_rng: dict | None = None


def train(model: nn.Module, data: Any, config: TrainConfig, run_dir: Path, *, resume: bool = False,
          console: Any = None) -> TrainResult:
    """Fine-tune ``model`` (in place) on ``data.train``, evaluating on ``data.val`` every epoch.

    Under an initialized process group the model is wrapped in DDP here; on return the caller's
    object holds the last-epoch weights on every rank, on the device and in the memory format it
    came in. Raises TrainingError on a non-finite loss (nothing is saved) or on Ctrl-C (the
    current state is saved to ``train/last.pt`` first when finite).
    """
    cfg = config.resolved()
    run_dir = Path(run_dir)
    d = dist_utils.info()
    device = _pick_device(cfg.device, d)
    amp = cfg.amp and device.type == "cuda"
    channels_last = cfg.channels_last and device.type == "cuda"
    if len(data.train) == 0:
        raise UserInputError("the training set is empty")
    if len(data.val) == 0:
        raise UserInputError("the validation set is empty")

    last_path = ckpt.train_dir(run_dir) / ckpt.LAST
    saved = ckpt.load(last_path) if resume else None
    if saved is not None:
        _check_resumable(saved, cfg, last_path)
    if d.is_main:
        ckpt.train_dir(run_dir).mkdir(parents=True, exist_ok=True)
    _seed_all(cfg.seed + d.rank)  # per-rank dropout/augmentation streams; the shuffle uses cfg.seed

    given_device, given_training = _model_device(model), model.training
    state = _State()
    try:
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        _run(model, data, cfg, d, device, amp, channels_last, run_dir, saved, state, console)
    finally:
        if d.enabled:
            gc.collect()  # free the DDP wrapper (it sits in a reference cycle) and its hooks now
        # Hand the caller's object back as it came: same device, plain memory format, same mode.
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
        model.to(given_device)
        model.train(given_training)
    return TrainResult(history=list(state.history), best_top1=state.best_top1,
                       best_epoch=state.best_epoch, initial=dict(state.initial), interrupted=False)


def _run(model: nn.Module, data: Any, cfg: TrainConfig, d: dist_utils.DistInfo, device: torch.device,
         amp: bool, channels_last: bool, run_dir: Path, saved: dict | None, state: _State,
         console: Any) -> None:
    cuda = device.type == "cuda"
    if cuda:  # object collectives (RNG gather) and nccl use the current device
        torch.cuda.set_device(device)
    last_path = ckpt.train_dir(run_dir) / ckpt.LAST
    best_path = ckpt.train_dir(run_dir) / ckpt.BEST
    # Optimizer and schedule are built on the plain model: DDP and compile share its parameters.
    optimizer = build_optimizer(model, cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                wd_mode=cfg.wd_mode, wd_eps=cfg.wd_eps)
    sampler = EpochSampler(data.train, d.rank, d.world_size, cfg.seed, cfg.batch_size)
    per_rank = len(sampler.base)
    drop_last = per_rank >= cfg.batch_size  # avoid a ragged last batch (BN), unless it is all we have
    steps_per_epoch = per_rank // cfg.batch_size if drop_last else math.ceil(per_rank / cfg.batch_size)
    scheduler = warmup_cosine(optimizer, steps_per_epoch * cfg.epochs,
                              round(cfg.warmup_epochs * steps_per_epoch), cfg.schedule)
    persistent = cuda and cfg.workers > 0
    gpu_transform = getattr(data, "gpu_transform", None)  # set by build_data(..., gpu_decode=True)
    train_loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler,
                              num_workers=cfg.workers, pin_memory=cuda, drop_last=drop_last,
                              persistent_workers=persistent, collate_fn=collate(gpu_transform))
    val_loader = make_val_loader(data.val, 2 * cfg.batch_size, device, cfg.workers, persistent,
                             gpu_transform)
    if saved is not None:
        _restore(saved, model, optimizer, scheduler, state)

    train_fwd: nn.Module = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_fwd = DDP(model, device_ids=[device.index] if cuda else None)
    eval_fwd: nn.Module = model  # never the DDP wrapper: shards may differ in batch count
    if cfg.compile:
        # Compile the forward only; `model` itself stays an ordinary (parametrized) module.
        train_fwd = torch.compile(train_fwd)
        eval_fwd = torch.compile(model) if d.enabled else train_fwd

    log = MetricsLog(run_dir / "metrics.jsonl" if d.is_main else None)
    progress = Progress(console, cfg.epochs, enabled=d.is_main and console is not None)
    loop = _Loop(cfg, d, device, model, train_fwd, eval_fwd, optimizer, scheduler, sampler,
                 train_loader, val_loader, amp, channels_last, log, progress, state,
                 last_path, best_path, gpu_transform)
    if cfg.diagnostics and d.is_main:
        from .diagnostics import Diagnostics
        loop.diagnostics = Diagnostics(model, optimizer, cfg.diagnostics, run_dir,
                                       optimizer_name=cfg.optimizer, momentum=cfg.momentum,
                                       write_initial=saved is None)
    try:
        if saved is None:
            state.initial = {k: v for k, v in loop.validate().items() if k != "images"}
        else:
            _restore_rng(saved, d, device, cfg.seed)
        loop.run()
    except _NonFinite as err:
        where = f"the last good checkpoint is kept at {last_path}" if last_path.exists() else \
            "no checkpoint was written yet"
        raise TrainingError(f"{err}; {where}") from None
    except KeyboardInterrupt:
        raise TrainingError(loop.save_interrupted(run_dir)) from None
    finally:
        if loop.batches is not None:
            loop.batches.close()  # stops the GPU-decode thread after Ctrl-C or a bad loss
        progress.close()
        log.close()
        if loop.diagnostics is not None:
            loop.diagnostics.close()


class _Loop:
    """The epoch/step loop; holds the objects ``train`` builds so the loop reads linearly."""

    def __init__(self, cfg: TrainConfig, d: dist_utils.DistInfo, device: torch.device, model: nn.Module,
                 train_fwd: nn.Module, eval_fwd: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, sampler: EpochSampler, train_loader: DataLoader,
                 val_loader: DataLoader, amp: bool, channels_last: bool, log: MetricsLog,
                 progress: Progress, state: _State, last_path: Path, best_path: Path,
                 gpu_transform: Any = None) -> None:
        self.cfg, self.d, self.device, self.model = cfg, d, device, model
        self.train_fwd, self.eval_fwd = train_fwd, eval_fwd
        self.optimizer, self.scheduler, self.sampler = optimizer, scheduler, sampler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.amp, self.channels_last = amp, channels_last
        self.log, self.progress, self.state = log, progress, state
        self.last_path, self.best_path = last_path, best_path
        self.gpu_transform = gpu_transform
        self.batches: Generator[tuple[Tensor, Tensor], None, None] | None = None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.train_seconds, self.train_images = 0.0, 0
        self.saved_epoch = state.epoch  # epoch held by last.pt (the resumed one, or 0: none)
        self.diagnostics: Any = None  # models.diagnostics.Diagnostics on rank 0 when enabled

    def validate(self) -> dict:
        return evaluate_loader(self.eval_fwd, self.model, self.val_loader, self.device, self.amp,
                                self.channels_last, self.gpu_transform)

    def run(self) -> None:
        s = self.state
        resume_mid_epoch = s.in_epoch
        for epoch in range(s.epoch + 1, self.cfg.epochs + 1):
            if not resume_mid_epoch:
                s.in_epoch, s.batches, s.loss_sum, s.images = True, 0, 0.0, 0
            resume_mid_epoch = False
            s.epoch_rng = ckpt.capture_rng(self.device)
            self._train_epoch(epoch)
            self._end_epoch(epoch)

    def _train_epoch(self, epoch: int) -> None:
        s, cfg = self.state, self.cfg
        self.sampler.set_epoch(epoch, s.batches)
        self.model.train()
        self.progress.start_epoch(epoch, s.batches + len(self.train_loader), s.batches)
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        t0 = win_t0 = time.perf_counter()
        images0, win_loss, win_images = s.images, 0.0, 0
        # With GPU decode this feeds a background thread; _run's finally closes it on an error.
        self.batches = device_batches_of(self.train_loader, self.gpu_transform, self.device, train=True)
        for x, y in self.batches:
            x = x.to(self.device, non_blocking=True, memory_format=fmt)
            y = y.to(self.device, non_blocking=True)
            loss = self._step(x, y, epoch)
            n = x.shape[0] * self.d.world_size  # every rank runs equal-sized batches
            s.batches += 1
            s.loss_sum += loss * n
            s.images += n
            win_loss += loss * n
            win_images += n
            now = time.perf_counter()
            self.progress.step(loss, s.last_lr, (s.images - images0) / max(now - t0, 1e-9))
            if cfg.log_every and s.step % cfg.log_every == 0:
                self.log.write({"step": s.step, "epoch": epoch, "loss": win_loss / win_images,
                                "lr": s.last_lr, "images_per_s": win_images / max(now - win_t0, 1e-9)})
                win_t0, win_loss, win_images = now, 0.0, 0
        self.train_seconds = time.perf_counter() - t0
        self.train_images = s.images - images0

    def _step(self, x: Tensor, y: Tensor, epoch: int) -> float:
        s = self.state
        with autocast(self.device, self.amp):
            out = logits(self.train_fwd(x))
        loss = self.criterion(out.float(), y)
        # The mean over ranks, known on every rank, so all ranks stop together on a bad loss
        # (a lone rank raising would leave the others waiting in DDP's gradient all-reduce).
        value = loss.detach().clone()
        if self.d.enabled:
            dist_utils.all_reduce_sum(value)
            value /= self.d.world_size
        value_f = float(value)
        if not math.isfinite(value_f):
            raise _NonFinite(f"loss became {value_f} at epoch {epoch} step {s.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        s.last_lr = float(self.optimizer.param_groups[0]["lr"])
        diag = self.diagnostics if self.diagnostics is not None and \
            self.diagnostics.due(s.step + 1) else None
        if diag is not None:
            diag.before_step(s.step + 1, epoch, s.last_lr)
        self.optimizer.step()
        if diag is not None:
            diag.after_step()
        self.scheduler.step()
        s.step += 1
        return value_f

    def _end_epoch(self, epoch: int) -> None:
        s = self.state
        dist_utils.broadcast_buffers(self.model)  # BN running stats: rank 0's everywhere
        val = self.validate()
        m = EpochMetrics(epoch=epoch, train_loss=s.loss_sum / max(s.images, 1),
                         val_loss=val["val_loss"], val_top1=val["val_top1"], val_top5=val["val_top5"],
                         lr=s.last_lr, images_per_s=self.train_images / max(self.train_seconds, 1e-9))
        weights = self.model.state_dict()
        if not ckpt.all_finite(weights):  # same weights on every rank: all ranks stop here
            raise _NonFinite(f"weights became non-finite at epoch {epoch} step {s.step}")
        improved = m.val_top1 > s.best_top1
        s.history.append(m)
        if improved:
            s.best_top1, s.best_epoch = m.val_top1, epoch
        s.epoch, s.in_epoch, s.batches, s.loss_sum, s.images = epoch, False, 0, 0.0, 0
        rngs = dist_utils.all_gather_objects(ckpt.capture_rng(self.device))
        if self.d.is_main:
            payload = self._payload(weights, rngs)
            ckpt.save_atomic(payload, self.last_path)
            self.saved_epoch = epoch
            if improved:
                ckpt.save_atomic(payload, self.best_path)
            self.log.write(m.to_dict())
            self.progress.epoch_done(m)

    def _payload(self, weights: dict, rngs: list) -> dict:
        s = self.state
        partial = None
        if s.in_epoch:
            partial = {"batches": s.batches, "loss_sum": s.loss_sum, "images": s.images}
        return {
            "format": 1,
            "model": weights,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaling
            "epoch": s.epoch,
            "step": s.step,
            "best": {"top1": s.best_top1, "epoch": s.best_epoch},
            "config": self.cfg.to_dict(),
            "history": [m.to_dict() for m in s.history],
            "initial": dict(s.initial),
            "partial": partial,
            "last_lr": s.last_lr,
            "rng": rngs,
            "world_size": self.d.world_size,
        }

    def save_interrupted(self, run_dir: Path) -> str:
        """Save the current state after Ctrl-C (rank 0, finite weights only); the user message."""
        s = self.state
        resume = f"continue with --resume {run_dir}"
        if not s.in_epoch:
            if s.epoch == 0:
                return "training interrupted before the first epoch; no checkpoint was written"
            if self.saved_epoch == s.epoch:  # between epochs: last.pt already holds this state
                return f"training interrupted after epoch {s.epoch}; {resume}"
        where = f"epoch {s.epoch + 1} step {s.step}" if s.in_epoch else f"the end of epoch {s.epoch}"
        if not self.d.is_main:
            return f"training interrupted at {where}; {resume}"
        weights = self.model.state_dict()
        if not ckpt.all_finite(weights):
            kept = f"the last good checkpoint is kept at {self.last_path}" if self.last_path.exists() \
                else "no checkpoint was written"
            return f"training interrupted at {where} with non-finite weights; {kept}"
        # No collectives here: other ranks may be anywhere, so only rank 0's RNG state is kept.
        # Mid-epoch the epoch-start state is kept: with nothing trained yet it resumes exactly.
        rng = s.epoch_rng if s.in_epoch else ckpt.capture_rng(self.device)
        ckpt.save_atomic(self._payload(weights, [rng]), self.last_path)
        return f"training interrupted at {where}; state saved to {self.last_path}; {resume}"


def _check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    old = saved.get("config", {})
    diff = [f for f in _TRAJECTORY_FIELDS if f in old and old[f] != getattr(cfg, f)]
    if diff:
        shown = ", ".join(f"{f} {old[f]!r} -> {getattr(cfg, f)!r}" for f in diff)
        raise UserInputError(f"cannot resume {path}: training settings changed ({shown})")


def _restore(saved: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             state: _State) -> None:
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(f"training checkpoint does not match this model: {first}") from None
    scheduler.load_state_dict(saved["scheduler"])
    state.epoch, state.step = int(saved["epoch"]), int(saved["step"])
    state.best_top1, state.best_epoch = float(saved["best"]["top1"]), int(saved["best"]["epoch"])
    state.history = [EpochMetrics(**m) for m in saved["history"]]
    state.initial = dict(saved["initial"])
    state.last_lr = float(saved.get("last_lr", 0.0))
    partial = saved.get("partial")
    if partial:
        state.in_epoch = True
        state.batches, state.loss_sum = int(partial["batches"]), float(partial["loss_sum"])
        state.images = int(partial["images"])


def _restore_rng(saved: dict, d: dist_utils.DistInfo, device: torch.device, seed: int) -> None:
    rngs = saved.get("rng") or []
    if d.rank < len(rngs) and int(saved.get("world_size", 1)) == d.world_size:
        ckpt.restore_rng(rngs[d.rank], device)
    else:  # another world size, or a Ctrl-C checkpoint that only kept rank 0: reseed distinctly
        _seed_all(seed + d.rank + 7919 * (int(saved["epoch"]) + 1))
