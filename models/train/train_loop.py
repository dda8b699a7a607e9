"""The epoch/step loop of :func:`wnconvert.models.train.train.train` and its checkpoints."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .batches import EpochSampler, autocast, device_batches_of, evaluate_loader, logits
from .progress import MetricsLog, Progress
from .train_config import TrainConfig


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


class NonFinite(Exception):
    pass


class Stop(Exception):
    """SIGINT/SIGTERM arrived: raised between two steps, so the state is a completed step's."""


@dataclass
class LoopState:
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
    epoch_rng: dict | None = None     # RNG state at the epoch's start
    stop: int = 0                     # the signal that asked to stop (checked between steps)
    resume_rng: dict | None = None    # RNG state of the step a mid-epoch checkpoint was saved at


@dataclass
class LoopEnv:
    """Where and how the loop runs."""

    cfg: TrainConfig
    d: dist_utils.DistInfo
    device: torch.device
    amp: bool
    channels_last: bool
    gpu_transform: Any = None       # GPU decode (build_data(..., gpu_decode=True)), else None


@dataclass
class LoopParts:
    """What the loop trains: the model, its DDP/compiled forwards, optimizer and data."""

    model: nn.Module
    train_fwd: nn.Module
    eval_fwd: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader


@dataclass
class LoopOutputs:
    log: MetricsLog
    progress: Progress
    last_path: Path
    best_path: Path


class Loop:
    """The epoch/step loop over the objects ``train`` builds; checkpoints go through :class:`Saver`."""

    def __init__(self, env: LoopEnv, parts: LoopParts, out: LoopOutputs, state: LoopState) -> None:
        self.cfg, self.d, self.device = env.cfg, env.d, env.device
        self.amp, self.channels_last, self.gpu_transform = env.amp, env.channels_last, env.gpu_transform
        self.model, self.train_fwd, self.eval_fwd = parts.model, parts.train_fwd, parts.eval_fwd
        self.optimizer, self.scheduler, self.sampler = parts.optimizer, parts.scheduler, parts.sampler
        self.train_loader, self.val_loader = parts.train_loader, parts.val_loader
        self.log, self.progress, self.state = out.log, out.progress, state
        self.saver = Saver(env, parts, out.last_path, out.best_path, state)
        self.batches: Generator[tuple[Tensor, Tensor], None, None] | None = None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.train_seconds, self.train_images = 0.0, 0
        self.diagnostics: Any = None  # models.train.diagnostics.Diagnostics on rank 0 when enabled
        self.on_epoch: Any = None     # called with the epoch number before each epoch trains

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
            if s.stop:
                raise Stop
            s.epoch_rng = ckpt.capture_rng(self.device)
            if self.on_epoch is not None:
                self.on_epoch(epoch)
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
        if s.resume_rng is not None:  # after the loader drew its seed, as the uninterrupted run did
            ckpt.restore_rng(s.resume_rng, self.device)
            s.resume_rng = None
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
            if s.stop:
                raise Stop
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
            raise NonFinite(f"loss became {value_f} at epoch {epoch} step {s.step + 1}")
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
            raise NonFinite(f"weights became non-finite at epoch {epoch} step {s.step}")
        improved = m.val_top1 > s.best_top1
        s.history.append(m)
        if improved:
            s.best_top1, s.best_epoch = m.val_top1, epoch
        s.epoch, s.in_epoch, s.batches, s.loss_sum, s.images = epoch, False, 0, 0.0, 0
        rngs = dist_utils.all_gather_objects(ckpt.capture_rng(self.device))
        if self.d.is_main:
            self.saver.save_epoch(epoch, weights, rngs, improved)
            self.log.write(m.to_dict())
            self.progress.epoch_done(m)


class Saver:
    """Writes ``train/last.pt`` and ``train/best.pt``: after each epoch, and after Ctrl-C."""

    def __init__(self, env: LoopEnv, parts: LoopParts, last_path: Path, best_path: Path,
                 state: LoopState) -> None:
        self.cfg, self.d, self.device = env.cfg, env.d, env.device
        self.model, self.optimizer, self.scheduler = parts.model, parts.optimizer, parts.scheduler
        self.last_path, self.best_path, self.state = last_path, best_path, state
        self.saved_epoch = state.epoch  # epoch held by last.pt (the resumed one, or 0: none)

    def save_epoch(self, epoch: int, weights: dict, rngs: list, improved: bool) -> None:
        payload = self._payload(weights, rngs)
        ckpt.save_atomic(payload, self.last_path)
        self.saved_epoch = epoch
        if improved:  # best.pt is this very file: a hard link, not a second copy
            ckpt.link_atomic(self.last_path, self.best_path)

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

    def save_interrupted(self, run_dir: Path, at_step: bool = False) -> str:
        """Save the current state after Ctrl-C (rank 0, finite weights only); the user message.
        ``at_step``: stopped between two steps (a signal), so the RNG state is that of the last
        completed step too, and a resume continues exactly (single process, any ``--workers``)."""
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
        # Mid-epoch the epoch-start state is kept (it resumes exactly with nothing trained yet);
        # stopped between steps, the step's state too, restored once the loader drew its seed.
        rng = s.epoch_rng if s.in_epoch else ckpt.capture_rng(self.device)
        payload = self._payload(weights, [rng])
        if at_step and payload["partial"] is not None:
            payload["partial"]["rng"] = ckpt.capture_rng(self.device)
        ckpt.save_atomic(payload, self.last_path)
        return f"training interrupted at {where}; state saved to {self.last_path}; {resume}"
