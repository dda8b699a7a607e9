"""The settings of a training run (:class:`TrainConfig`), validated before anything is built.

No torch at import: the command line reads the defaults for ``--help``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ...convert.errors import UserInputError
from .optim_settings import OPTIMIZERS, SCHEDULES, WD_MODES, check_hyperparameters, resolve_defaults

DEVICES = ("auto", "cpu", "cuda")
# Fields that shape the optimization trajectory: a resumed run must use the same values.
TRAJECTORY_FIELDS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov",
                      "weight_decay", "wd_mode", "wd_eps", "warmup_epochs", "schedule", "label_smoothing",
                      "grad_clip", "seed")


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 128             # per process; the global batch is batch_size * world size
    optimizer: str = "adamw"          # sgd | adamw | lars (docs/training.md: why adamw)
    lr: float | None = None           # None -> models.train.optim.DEFAULTS[optimizer].lr
    momentum: float = 0.9             # SGD/LARS momentum; AdamW beta1
    nesterov: bool = False
    weight_decay: float | None = None  # None -> models.train.optim.DEFAULTS[optimizer].weight_decay
    wd_mode: str = "l2"               # decay of raw reparametrized weights: l2 | eps-shifted | none
    wd_eps: float | None = None       # None -> models.train.optim.DEFAULT_WD_EPS
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
    diagnostics: int = 0              # steps between dynamics.jsonl records (models/train/diagnostics.py); 0 = off

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
        if self.device.startswith("cuda") and not _cuda_available():
            bad(f"device {self.device!r} requested but no CUDA device is available")
        lr, wd, eps = resolve_defaults(self.optimizer, self.lr, self.weight_decay, self.wd_eps)
        check_hyperparameters(self.optimizer, lr=lr, momentum=self.momentum, nesterov=self.nesterov,
                              weight_decay=wd, wd_eps=eps)


def _cuda_available() -> bool:
    # torch is loaded only when a CUDA device is asked for: the command line reads TrainConfig's
    # defaults for --help and its parser errors without loading it.
    import torch

    return torch.cuda.is_available()
