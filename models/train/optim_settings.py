"""The optimizer and schedule names, their default settings and the checks of a setting, as plain
values: no torch, so the command line reads them for ``--help``. Why the defaults are these:
:mod:`.optim`'s docstring and docs/training.md."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...convert.errors import UserInputError

SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("sgd", "adamw", "lars")
WD_MODES = ("l2", "eps-shifted", "none")


@dataclass(frozen=True)
class OptimDefaults:
    lr: float
    weight_decay: float


DEFAULTS: dict[str, OptimDefaults] = {
    "sgd": OptimDefaults(lr=0.01, weight_decay=1e-4),
    "adamw": OptimDefaults(lr=1e-4, weight_decay=0.05),
    "lars": OptimDefaults(lr=0.01, weight_decay=1e-4),
}
# Training from scratch (`--weights none`) needs the usual from-scratch rates, ten times the
# fine-tuning ones, and the CIFAR-style decay.
SCRATCH_DEFAULTS: dict[str, OptimDefaults] = {
    "sgd": OptimDefaults(lr=0.1, weight_decay=5e-4),
    "adamw": OptimDefaults(lr=1e-3, weight_decay=0.05),
    "lars": OptimDefaults(lr=0.1, weight_decay=5e-4),
}
DEFAULT_WD_EPS = 1e-3
DEFAULT_MOMENTUM = 0.9


def resolve_defaults(optimizer: str, lr: float | None, weight_decay: float | None,
                     wd_eps: float | None) -> tuple[float, float, float]:
    """``(lr, weight_decay, wd_eps)`` with ``None`` replaced by the documented default."""
    if optimizer not in DEFAULTS:
        raise UserInputError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    d = DEFAULTS[optimizer]
    return (d.lr if lr is None else lr,
            d.weight_decay if weight_decay is None else weight_decay,
            DEFAULT_WD_EPS if wd_eps is None else wd_eps)


def check_hyperparameters(optimizer: str, *, lr: float, momentum: float, nesterov: bool,
                          weight_decay: float, wd_eps: float) -> None:
    """UserInputError (one line) for settings no optimizer can run with; ``TrainConfig.validate``
    calls it before a run directory is created, ``build_optimizer`` again."""
    if optimizer not in OPTIMIZERS:
        raise UserInputError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if not (lr > 0 and math.isfinite(lr)):
        raise UserInputError(f"learning rate must be a positive number, got {lr}")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise UserInputError(f"weight decay must be >= 0, got {weight_decay}")
    if not (wd_eps >= 0 and math.isfinite(wd_eps)):
        raise UserInputError(f"wd eps must be >= 0, got {wd_eps}")
    if not 0 <= momentum < 1:
        raise UserInputError(f"momentum must be in [0, 1), got {momentum}")
    if nesterov and (optimizer == "adamw" or momentum == 0):
        raise UserInputError("--nesterov needs sgd or lars with momentum > 0")
