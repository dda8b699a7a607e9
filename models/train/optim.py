"""Optimizers, parameter groups, weight decay for reparametrized weights, and the LR schedule.

Why the groups look the way they do
-----------------------------------
A scheme makes the layer's effective weight ``gain * N(W)`` independent of the scale of the raw
tensor ``W``. For such scale-invariant weights the loss gradient is orthogonal to ``W``, so SGD steps
only ever *grow* ``||W||`` and every step shrinks the effective learning rate (~ lr / ||W||^2).
Weight decay is what stops that drift: it balances the growth and holds ``||W||`` (hence the
effective step size) at an equilibrium. So decay on raw reparametrized weights is an optimization
control, not a regularizer; removing it (``wd_mode='none'``) makes training stall over time.

Plain L2 has no minimum on such weights (shrinking W always lowers it) and with a too-large
lambda, or with Adam-style coupled L2, ``||W||`` can collapse towards 0 where the gradient
(~ 1/||W||) overflows. The eps-shifted variant penalizes ``1/2 lambda (||W|| - eps)^2`` instead:
the same decay while ``||W|| >> eps``, but it pulls the norm back up below ``eps``, so a minimum
exists and the norm is kept away from zero.

Gains/offsets of the schemes, normalization layers and biases are never decayed: decaying a gain
changes the function directly (it is the layer's scale) and shrinks the model towards zero output.

Defaults (see docs/training.md; ``tests/test_optim.py`` checks the two agree)
----------------------------------------------------------------------------
=========  ======  =======  ===================================================================
optimizer  lr      wd       why
=========  ======  =======  ===================================================================
sgd        0.01    1e-4     fine-tuning rate (10x below from-scratch 0.1) for batch 128; 1e-4 is
                            the ImageNet decay under which the pretrained norms equilibrated
adamw      1e-4    0.05     Adam moves each element by ~lr, i.e. ~lr/rms(W) ~ 0.5 % relative for
                            pretrained convs, like the sgd default; decay is decoupled
lars       0.01    1e-4     same lr as sgd so excluded params (BN, bias, gains) move as under sgd
=========  ======  =======  ===================================================================

LARS trust coefficient ``eta = sqrt(2 wd (1 - momentum) / lr)`` at the sgd defaults (~0.045): SGD
with momentum and weight decay drives ``||w||/||g||`` of scale-invariant weights to
``sqrt(lr / (2 wd (1 - momentum)))``, i.e. it already takes LARS-like steps with effective rate
``sqrt(2 lr wd (1 - momentum))``; choosing eta this way makes ``lars`` at its defaults take the
steps that the ``sgd`` default takes once at equilibrium, without waiting to get there.

eps-shifted eps default 1e-3: the value that did best for WS-ResNet-50 on ImageNet in Li et al.
(accuracy was flat over 1e-2..1e-5). Our ``||W||`` is over the whole tensor, larger than any
per-filter norm, so 1e-3 acts as a floor against collapse and leaves normal training unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ...convert.apply import scheme_parameters
from ...convert.errors import UserInputError
from .optim_settings import (  # noqa: F401 (re-exported)
    DEFAULT_MOMENTUM,
    DEFAULT_WD_EPS,
    DEFAULTS,
    OPTIMIZERS,
    SCHEDULES,
    WD_MODES,
    check_hyperparameters,
)
from .scale_group import adam_direction_pre_hook, scale_group, scale_parameters

# Myrtle's equilibrium relation at the sgd defaults; see the module docstring.
LARS_TRUST = math.sqrt(2 * DEFAULTS["sgd"].weight_decay * (1 - DEFAULT_MOMENTUM) / DEFAULTS["sgd"].lr)
ADAM_BETA2 = 0.999

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


# -- eps-shifted decay -------------------------------------------------------------------------

def shifted_l2_grad(w: Tensor, lam: float, eps: float) -> Tensor:
    """Gradient of ``1/2 lam (||w|| - eps)^2``: ``lam (||w|| - eps) w / ||w||``; zero for w == 0
    (the direction is undefined there and any subgradient is fine; zero avoids 0/0)."""
    return _shifted_coef(w, lam, eps) * w


def _shifted_coef(w: Tensor, lam: float, eps: float) -> Tensor:
    x = w.detach()
    if x.dtype in (torch.float16, torch.bfloat16):  # a half-precision norm would overflow
        x = x.float()
    norm = torch.linalg.vector_norm(x)
    safe = norm.clamp_min(torch.finfo(norm.dtype).tiny)
    return torch.where(norm > 0, lam * (norm - eps) / safe, torch.zeros_like(norm)).to(w.dtype)


@torch.no_grad()
def _apply_shifted_decay(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """Optimizer step pre-hook: the eps-shifted term, per tensor, for groups that ask for it.

    Coupled (added to the gradient, like SGD's weight_decay) for sgd/lars; decoupled (a direct
    shrink by ``lr * grad``, like AdamW's) for adamw, where a coupled term would be rescaled by
    Adam's second-moment normalization and lose its meaning.
    """
    for group in optimizer.param_groups:
        lam = group.get("shifted_wd", 0.0)
        if not lam:
            continue
        for p in group["params"]:
            if p.grad is None:
                continue
            term = shifted_l2_grad(p, lam, group["shifted_eps"])
            if group.get("decoupled", False):
                p.sub_(term, alpha=group["lr"])
            else:
                p.grad.add_(term)


# -- LARS --------------------------------------------------------------------------------------

class LARS(Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al., 2017).

    For a group with ``trust=True`` each tensor's step ``g + wd*w`` is scaled by
    ``eta * ||w|| / (||g|| + wd * ||w||)`` before entering the momentum buffer, so every layer moves
    by about ``lr * eta`` of its own norm whatever its gradient scale. Groups with ``trust=False``
    (BN, biases, gains: tiny or zero-norm tensors where the ratio is meaningless) are plain SGD.
    When either norm is zero the ratio is 1.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = DEFAULT_MOMENTUM,
                 weight_decay: float = 0.0, trust_coefficient: float = LARS_TRUST,
                 nesterov: bool = False) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS needs lr > 0, 0 <= momentum < 1, weight_decay >= 0, trust_coefficient > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, nesterov=nesterov, trust=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom, lr = group["weight_decay"], group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                d = g.add(p, alpha=wd) if wd else g.clone()
                if group["trust"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    ratio = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm),
                                        torch.ones_like(w_norm))
                    d.mul_(ratio)
                if mom:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(mom).add_(d)
                    d = d.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(d, alpha=-lr)
        return loss


# -- parameter groups --------------------------------------------------------------------------

def param_groups(model: nn.Module, *, weight_decay: float, wd_mode: str, wd_eps: float,
                 decoupled: bool, scale_lr: float | None = None, optimizer: str = "sgd") -> list[dict[str, Any]]:
    """Split trainable parameters into ``reparam`` (raw scheme weights: ``wd_mode`` decay),
    ``decay`` (other weights: plain L2) and ``no_decay`` (norm layers, biases, 1-d tensors,
    scheme gains/offsets). Empty groups are dropped. Extra keys ride along in the optimizer's
    param groups (and its state_dict): ``name``, ``trust`` (LARS), ``shifted_wd``/``shifted_eps``
    (eps-shifted pre-hook) and ``decoupled``. With ``scale_lr`` the learned log2 scales (activation
    quantizers, learned weight ranges) form a last group, ``scales``, that takes Adam's step
    whatever ``optimizer`` is (models/train/scale_group.py)."""
    if wd_mode not in WD_MODES:
        raise UserInputError(f"unknown wd mode {wd_mode!r}; choose one of: {', '.join(WD_MODES)}")
    raw, affine = scheme_parameters(model)
    raw_ids, affine_ids = {id(p) for p in raw}, {id(p) for p in affine}
    buckets: dict[str, list[nn.Parameter]] = {"reparam": [], "decay": [], "no_decay": []}
    scales = scale_parameters(model) if scale_lr is not None else []
    seen: set[int] = {id(p) for p in scales}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if id(p) in raw_ids:
                buckets["reparam"].append(p)
            elif (id(p) in affine_ids or isinstance(module, _NORM_TYPES) or name.endswith("bias")
                  or p.ndim <= 1):
                buckets["no_decay"].append(p)
            else:
                buckets["decay"].append(p)

    def group(name: str, wd: float, shifted: float = 0.0, trust: bool = True) -> dict[str, Any]:
        return {"params": buckets[name], "name": name, "weight_decay": wd, "shifted_wd": shifted,
                "shifted_eps": wd_eps, "trust": trust, "decoupled": decoupled}

    reparam_wd = {"l2": weight_decay, "eps-shifted": 0.0, "none": 0.0}[wd_mode]
    shifted = weight_decay if wd_mode == "eps-shifted" else 0.0
    groups = [group("reparam", reparam_wd, shifted), group("decay", weight_decay),
              group("no_decay", 0.0, trust=False)]
    if scales:
        groups.append(scale_group(scales, optimizer, float(scale_lr), decoupled))
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, optimizer: str, *, lr: float, momentum: float = DEFAULT_MOMENTUM,
                    nesterov: bool = False, weight_decay: float, wd_mode: str = "l2",
                    wd_eps: float = DEFAULT_WD_EPS, scale_lr: float | None = None) -> Optimizer:
    """The optimizer for ``model`` with the groups above; eps-shifted decay (and, for sgd/lars, the
    scales' Adam direction) is a step pre-hook, so callers just call ``step()``. For adamw,
    ``momentum`` is beta1 and ``nesterov`` is rejected."""
    check_hyperparameters(optimizer, lr=lr, momentum=momentum, nesterov=nesterov,
                          weight_decay=weight_decay, wd_eps=wd_eps)
    groups = param_groups(model, weight_decay=weight_decay, wd_mode=wd_mode, wd_eps=wd_eps,
                          decoupled=optimizer == "adamw", scale_lr=scale_lr, optimizer=optimizer)
    if not groups:
        raise UserInputError("the model has no trainable parameters")
    opt: Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=(momentum, ADAM_BETA2))
    else:
        opt = LARS(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if wd_mode == "eps-shifted" and weight_decay > 0:
        opt.register_step_pre_hook(_apply_shifted_decay)
    if any(g.get("scale_adam") for g in opt.param_groups):
        opt.register_step_pre_hook(adam_direction_pre_hook)
    return opt


# -- schedule ----------------------------------------------------------------------------------


class WarmupCosine:
    """LR factor for optimizer step ``k`` (0-based): linear warmup ``(k+1)/warmup`` over
    ``warmup_steps``, then half a cosine from 1 to 0 over the remaining steps, or (``shape=
    "constant"``) 1 until the end. A constant rate is what lets SGD's weight norms reach the
    equilibrium of docs/gradients.md; the cosine is the better default for accuracy.

    A plain class rather than a lambda so that LambdaLR's state_dict records its fields.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, shape: str = "cosine") -> None:
        if shape not in SCHEDULES:
            raise UserInputError(f"unknown schedule {shape!r}; choose one of: {', '.join(SCHEDULES)}")
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, min(int(warmup_steps), self.total_steps))
        self.shape = shape

    def __call__(self, k: int) -> float:
        if k < self.warmup_steps:
            return (k + 1) / self.warmup_steps
        if self.shape == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (k - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                  shape: str = "cosine") -> LambdaLR:
    """Per-iteration schedule: call ``.step()`` after every optimizer step."""
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, shape))
