"""The ``scales`` parameter group: learned quantization scales that move under any optimizer.

Which parameters: the log2 scale of every learned activation quantizer
(``ActQuantizer.log2_scale``, docs/actquant.md) and the log2 clip ratio of every learned weight
range (``LearnedClip.log2_clip``, convert/clip.py). All are log2 quantities: a step of 1 is a
factor of two of the range, in any layer.

The rule: whatever the weights' optimizer, these parameters take Adam's step,
``scale_lr · m̂ / (√v̂ + ε)`` with ``betas = (0.9, 0.999)``, no weight decay, and the run's
schedule (warmup, cosine) on ``scale_lr``. Under ``adamw`` the group is a native AdamW group with
those settings; under ``sgd`` and ``lars`` the group has no momentum, decay or trust ratio and a
step pre-hook replaces each gradient by Adam's direction (moments kept in the optimizer's state,
so they are checkpointed and a resumed run continues them exactly).

Why (docs/training.md has the measured figures): the LSQ gradients of these parameters are
2e-6..4e-4 in log2 units (measured, docs/training.md), orders of magnitude below the weights', and differ from layer
to layer
and between activations and weights. An SGD step ``lr · g`` then moves a scale by ~1e-8 octave
per step at ``lr = 1e-3``: nothing, which is why the scales did not learn under ``--optimizer
sgd``. Adam's normalized step does not depend on the gradient's size, so one number,
``scale_lr`` octaves per step at most, fits every scale and every optimizer; with it the scales
learn the same way whether the weights use SGD, AdamW or LARS.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ...convert.actquant.quantizer import ActQuantizer
from ...convert.clip import LearnedClip

SCALE_BETAS = (0.9, 0.999)
SCALE_EPS = 1e-12   # far below the gradients measured (1e-6 and up, docs/training.md): never sets the step


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned log2 scales of ``model`` (activation quantizers, learned weight ranges)."""
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        p = None
        if isinstance(module, ActQuantizer):
            p = module.log2_scale
        elif isinstance(module, LearnedClip):
            p = module.log2_clip
        if isinstance(p, nn.Parameter) and p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def scale_group(params: list[nn.Parameter], optimizer: str, scale_lr: float, decoupled: bool) -> dict[str, Any]:
    """The optimizer group of the scales (see the module docstring)."""
    group: dict[str, Any] = {"params": params, "name": "scales", "lr": scale_lr, "weight_decay": 0.0,
                             "shifted_wd": 0.0, "shifted_eps": 0.0, "trust": False, "decoupled": decoupled}
    if optimizer == "adamw":
        group.update(betas=SCALE_BETAS, eps=SCALE_EPS)
    else:  # sgd, lars: a plain step along the direction the pre-hook writes
        group.update(momentum=0.0, nesterov=False, scale_adam=True)
    return group


@torch.no_grad()
def adam_direction_pre_hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """Step pre-hook (sgd, lars): the ``scales`` group's gradients become Adam's direction."""
    b1, b2 = SCALE_BETAS
    for group in optimizer.param_groups:
        if not group.get("scale_adam"):
            continue
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state[p]
            if "scale_step" not in state:
                state["scale_step"] = torch.zeros((), dtype=torch.float32)
                state["scale_exp_avg"] = torch.zeros_like(p)
                state["scale_exp_avg_sq"] = torch.zeros_like(p)
            state["scale_step"] += 1
            t = float(state["scale_step"])
            g = p.grad
            state["scale_exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
            state["scale_exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = state["scale_exp_avg"] / (1 - b1 ** t)
            v_hat = state["scale_exp_avg_sq"] / (1 - b2 ** t)
            p.grad.copy_(m_hat / (v_hat.sqrt() + SCALE_EPS))
