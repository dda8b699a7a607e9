"""Fine-tuning loop: single process or torchrun/DDP, CPU or CUDA, resumable.

``train(model, data, config, run_dir)`` trains the caller's model object in place and returns a
:class:`TrainResult`. Outputs under ``run_dir`` (written by rank 0 only):

* ``metrics.jsonl``: a record every ``log_every`` steps ``{"step", "epoch", "loss", "lr",
  "images_per_s"}`` and one per epoch ``{"epoch", "train_loss", "val_loss", "val_top1",
  "val_top5", "lr", "images_per_s"}`` (accuracies as fractions); appended and flushed per line.
* ``train/last.pt`` after every epoch, ``train/best.pt`` whenever val top-1 improves
  (a hard link to that ``last.pt``; see :mod:`.checkpoint`).

Epochs are numbered from 1; ``step`` counts optimizer steps over the whole run. Resuming from an
epoch-end ``last.pt`` reproduces the uninterrupted run exactly on the same hardware and number of
processes (data order, schedule, optimizer and RNG state are all restored). SIGINT (Ctrl-C) or
SIGTERM mid-epoch stops the loop between two steps and saves that step's state (weights, BatchNorm
statistics, optimizer, schedule, RNG); resuming from it reproduces the uninterrupted run, with any
number of DataLoader workers: each batch's augmentation is seeded by (seed, epoch, batch), not by a
worker's stream (models/train/batches.py, SeededSamples). Under torchrun a signal interrupts at once
(ranks cannot agree on a step without a collective), as before.
"""

from __future__ import annotations

import gc
import itertools
import math
import random
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ...convert.errors import Interrupted, TrainingError, UserInputError
from ..files import METRICS
from . import checkpoint as ckpt
from . import distributed as dist_utils
from .batches import EpochSampler, SeededSamples, collate, evaluate, make_val_loader  # noqa: F401 (evaluate re-exported)
from .diagnostics import Diagnostics
from .optim import build_optimizer, warmup_cosine
from .progress import MetricsLog, Progress, truncate_log
from .train_config import DEVICES, TRAJECTORY_FIELDS, TrainConfig  # noqa: F401 (re-exported)
from .train_loop import EpochMetrics, Loop, LoopEnv, LoopOutputs, LoopParts, LoopState, NonFinite, Stop  # noqa: F401

__all__ = ["TrainConfig", "EpochMetrics", "TrainResult", "train", "evaluate"]

@dataclass
class TrainResult:
    history: list[EpochMetrics]
    best_top1: float
    best_epoch: int
    initial: dict  # {"val_top1", "val_top5", "val_loss"} before training (an interrupt raises TrainingError)


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

def train(model: nn.Module, data: Any, config: TrainConfig, run_dir: Path, *, resume: bool = False,
          console: Any = None, on_epoch: Callable[[int], None] | None = None) -> TrainResult:
    """Fine-tune ``model`` (in place) on ``data.train``, evaluating on ``data.val`` every epoch.

    Under an initialized process group the model is wrapped in DDP here; on return the caller's
    object holds the last-epoch weights on every rank, on the device and in the memory format it
    came in. Raises TrainingError on a non-finite loss (nothing is saved), Interrupted (exit 130)
    on SIGINT/SIGTERM (the last completed step is saved to ``train/last.pt`` first when finite).
    ``on_epoch(epoch)`` is called at the start of every epoch trained (e.g. to freeze BatchNorm,
    models/train/act_run.py).
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
    saved = ckpt.check_fields(ckpt.load(last_path), last_path) if resume else None
    if saved is not None:
        _check_resumable(saved, cfg, last_path)
    if d.is_main:
        ckpt.train_dir(run_dir).mkdir(parents=True, exist_ok=True)
        if saved is not None:  # the log as the checkpoint saw it: no duplicate or missing records
            truncate_log(run_dir / METRICS, int(saved["step"]), list(saved["history"]))
    _seed_all(cfg.seed + d.rank)  # per-rank dropout/augmentation streams; the shuffle uses cfg.seed

    given_device, given_training = _model_device(model), model.training
    state = LoopState()
    try:
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        _run(model, data, cfg, d, device, amp, channels_last, run_dir, saved, state, console, on_epoch)
    finally:
        if d.enabled:
            gc.collect()  # free the DDP wrapper (it sits in a reference cycle) and its hooks now
        # Hand the caller's object back as it came: same device, plain memory format, same mode.
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
        model.to(given_device)
        model.train(given_training)
    return TrainResult(history=list(state.history), best_top1=state.best_top1,
                       best_epoch=state.best_epoch, initial=dict(state.initial))


def _run(model: nn.Module, data: Any, cfg: TrainConfig, d: dist_utils.DistInfo, device: torch.device,
         amp: bool, channels_last: bool, run_dir: Path, saved: dict | None, state: LoopState,
         console: Any, on_epoch: Callable[[int], None] | None = None) -> None:
    cuda = device.type == "cuda"
    if cuda:  # object collectives (RNG gather) and nccl use the current device
        torch.cuda.set_device(device)
    last_path = ckpt.train_dir(run_dir) / ckpt.LAST
    best_path = ckpt.train_dir(run_dir) / ckpt.BEST
    env = LoopEnv(cfg, d, device, amp, channels_last, getattr(data, "gpu_transform", None))
    parts = _loop_parts(model, data, env, saved, state)
    log = MetricsLog(run_dir / METRICS if d.is_main else None)
    progress = Progress(console, cfg.epochs, enabled=d.is_main and console is not None)
    loop = Loop(env, parts, LoopOutputs(log, progress, last_path, best_path), state)
    loop.on_epoch = on_epoch
    if cfg.diagnostics and d.is_main:
        loop.diagnostics = Diagnostics(model, parts.optimizer, cfg.diagnostics, run_dir,
                                       optimizer_name=cfg.optimizer, momentum=cfg.momentum,
                                       write_initial=saved is None)
    try:
        with _stop_on_signals(state, enabled=not d.enabled):
            if saved is None:
                state.initial = {k: v for k, v in loop.validate().items() if k != "images"}
            else:
                _restore_rng(saved, d, device, cfg.seed)
                if (saved.get("partial") or {}).get("rng") is not None and d.world_size == 1:
                    state.resume_rng = saved["partial"]["rng"]
            loop.run()
    except NonFinite as err:
        where = f"the last good checkpoint is kept at {last_path}" if last_path.exists() else \
            "no checkpoint was written yet"
        raise TrainingError(f"{err}; {where}") from None
    except Stop:
        raise Interrupted(loop.saver.save_interrupted(run_dir, at_step=True)) from None
    except KeyboardInterrupt:
        raise Interrupted(loop.saver.save_interrupted(run_dir)) from None
    finally:
        if loop.batches is not None:
            loop.batches.close()  # stops the GPU-decode thread after Ctrl-C or a bad loss
        progress.close()
        log.close()
        if loop.diagnostics is not None:
            loop.diagnostics.close()


@contextmanager
def _stop_on_signals(state: LoopState, enabled: bool = True):
    """SIGINT and SIGTERM set ``state.stop``; the loop stops at the next step boundary and the
    state of the last completed step is saved. A second signal acts at once (default handler:
    the process dies; the lock goes with it and every file is written atomically). Not under
    torchrun: ranks stopping at different steps would wait on each other forever."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask_to_stop(signum, frame):
        state.stop = signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    previous = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _loop_parts(model: nn.Module, data: Any, env: LoopEnv, saved: dict | None, state: LoopState) -> LoopParts:
    """Optimizer, schedule, loaders and the (DDP / compiled) forwards the loop trains with; a
    resumed run's checkpoint is loaded before the model is wrapped."""
    cfg, d, device = env.cfg, env.d, env.device
    cuda = device.type == "cuda"
    gpu_transform = env.gpu_transform  # set by build_data(..., gpu_decode=True)
    # Optimizer and schedule are built on the plain model: DDP and compile share its parameters.
    optimizer = build_optimizer(model, cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                wd_mode=cfg.wd_mode, wd_eps=cfg.wd_eps, scale_lr=cfg.scale_lr)
    sampler = EpochSampler(data.train, d.rank, d.world_size, cfg.seed, cfg.batch_size)
    per_rank = len(sampler.base)
    drop_last = per_rank >= cfg.batch_size  # avoid a ragged last batch (BN), unless it is all we have
    steps_per_epoch = per_rank // cfg.batch_size if drop_last else math.ceil(per_rank / cfg.batch_size)
    scheduler = warmup_cosine(optimizer, steps_per_epoch * cfg.epochs,
                              round(cfg.warmup_epochs * steps_per_epoch), cfg.schedule)
    persistent = cuda and cfg.workers > 0
    train_loader = DataLoader(SeededSamples(data.train, cfg.seed), batch_size=cfg.batch_size, sampler=sampler,
                              num_workers=cfg.workers, pin_memory=cuda, drop_last=drop_last,
                              persistent_workers=persistent, collate_fn=collate(gpu_transform))
    val_loader = make_val_loader(data.val, 2 * cfg.batch_size, device, cfg.workers, persistent,
                                 gpu_transform)
    if saved is not None:
        _restore(saved, model, optimizer, scheduler, state)
    train_fwd: nn.Module = model
    if d.enabled:
        train_fwd = DDP(model, device_ids=[device.index] if cuda else None)
    eval_fwd: nn.Module = model  # never the DDP wrapper: shards may differ in batch count
    if cfg.compile:
        # Compile the forward only; `model` itself stays an ordinary (parametrized) module.
        train_fwd = torch.compile(train_fwd)
        eval_fwd = torch.compile(model) if d.enabled else train_fwd
    return LoopParts(model, train_fwd, eval_fwd, optimizer, scheduler, sampler, train_loader, val_loader)


def _check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    old = saved.get("config", {})
    diff = [f for f in TRAJECTORY_FIELDS if f in old and old[f] != getattr(cfg, f)]
    if diff:
        shown = ", ".join(f"{f} {old[f]!r} -> {getattr(cfg, f)!r}" for f in diff)
        raise UserInputError(f"cannot resume {path}: training settings changed ({shown})")


def _restore(saved: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             state: LoopState) -> None:
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
