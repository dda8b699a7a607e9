"""Training-dynamics diagnostics of reparametrized layers (``TrainConfig.diagnostics = K``).

Every ``K`` optimizer steps the engine calls :meth:`Diagnostics.before_step` (after backward and
gradient clipping, before ``optimizer.step()``) and :meth:`Diagnostics.after_step`; one JSON line
per logged step is appended to ``run_dir/dynamics.jsonl`` (rank 0 only; gradients are already
all-reduced by DDP, so rank 0's are everyone's)::

    {"step": 12, "epoch": 1, "lr": 0.01, "optimizer": "sgd", "layers": {"conv1": {...}, ...}}

Per layer (raw tensor ``W`` = ``parametrizations.weight.original``, ``g`` = its loss gradient as
the optimizer sees it, i.e. after clipping and before any decay term is added):

``w_norm``, ``w_max``       ``||W||`` and ``max|W|``
``g_norm``                  ``||g||``
``w_over_g``                ``||W|| / ||g||`` (omitted when ``g == 0``)
``equilibrium``             ``sqrt(lr / (2 wd (1 - momentum)))``: the value ``w_over_g`` approaches
                            under SGD with momentum and L2 decay on scale-invariant weights
                            (Myrtle, "How to train your ResNet 6"); sgd only, with decay > 0
                            (eps-shifted decay counts with its lambda: equal while ||W|| >> eps)
``eff_lr``                  sgd: ``lr / ||W||^2``; lars: ``lr * trust_ratio / ||W||^2`` (the
                            rate at which the direction ``W/||W||`` moves); adamw:
                            ``lr * sqrt(numel) / ||W||`` (Adam moves every element by ~lr, so this
                            is the relative step size)
``angle``                   angle in radians between ``W`` before and after the step
``grad_at_max``             ``|g|`` at ``argmax |W|`` (the element that carries the max)
``grad_max_ratio``          ``grad_at_max / mean |g|``: the extra path through ``max`` (see
                            docs/gradients.md); large for ``layer-max`` with ``scale_grad=full``
``frac_at_unit``            fraction of ``|N(W)| >= 1 - 1e-6`` (the elements at +-1)
``grid_changed``            for QAT parametrizations with a ``weight_bits`` attribute only: the
                            fraction of elements of ``N(W)`` whose ``weight_bits`` grid level
                            changed in this step

For an ``--act-bits`` run (an activation-QAT model, models/train/act_run.py) each record also holds
``"activations": {point: {"scale", "clipped", "sqnr_db"}}``: per activation quantizer its scale,
the fraction of elements clipped and the SQNR (dB) of the quantized tensor, measured on the
step's training batch run in eval mode (``actquant.activation_diagnostics``).

Non-finite values are written as ``null``. ``initial_weights.json`` (written once, when training
starts from scratch rather than resuming) holds a histogram of every layer's ``W / max|W|`` before
fine-tuning, for ``wnconvert report``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...convert.actquant import activation_diagnostics
from ...convert.apply import reparametrized
from ...convert.artifacts import read_jsonl
from ..files import DYNAMICS, INITIAL  # noqa: F401 (re-exported)

UNIT_TOL = 1e-6
HIST_BINS = 64


def _f(x: Any) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def unit_histogram(w: Tensor, bins: int = HIST_BINS) -> list[int]:
    """Counts of ``w / max|w|`` in ``bins`` equal bins over [-1, 1]."""
    x = w.detach().float().flatten()
    m = x.abs().max()
    if m > 0:
        x = x / m
    return torch.histc(x, bins=bins, min=-1.0, max=1.0).to(torch.int64).tolist()


class Diagnostics:
    """Collects the per-layer fields above; construct on rank 0 only."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int,
                 run_dir: Path, *, optimizer_name: str, momentum: float,
                 write_initial: bool = True) -> None:
        self.every = int(every)
        self.optimizer_name = optimizer_name
        self.momentum = float(momentum)
        self.layers: list[tuple[str, nn.Parameter, nn.Module]] = []
        for target, module, p in reparametrized(model):
            raw = module.parametrizations[target.tensor_name].original
            self.layers.append((target.qualname, raw, p))
        self.groups: dict[int, dict] = {}
        for g in optimizer.param_groups:
            for prm in g["params"]:
                self.groups[id(prm)] = g
        run_dir = Path(run_dir)
        self.path = run_dir / DYNAMICS
        self._f = open(self.path, "a", encoding="utf-8")
        self._pending: dict | None = None
        self.model, self._batch = model, None
        if "act_points" in getattr(model, "meta", {}):  # remember the batch the step trains on
            model.register_forward_pre_hook(self._remember)
        if write_initial and not (run_dir / INITIAL).exists():
            with torch.no_grad():
                hist = {name: unit_histogram(w) for name, w, _ in self.layers}
            (run_dir / INITIAL).write_text(json.dumps({"bins": HIST_BINS, "layers": hist}))

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is logged."""
        return self.every > 0 and step % self.every == 0

    @torch.no_grad()
    def before_step(self, step: int, epoch: int, lr: float) -> None:
        layers: dict[str, dict] = {}
        before: dict[str, Tensor] = {}
        levels: dict[str, Tensor] = {}
        for name, w, p in self.layers:
            if w.grad is None:
                continue
            x, g = w.detach().float(), w.grad.detach().float()
            group = self.groups.get(id(w), {})
            glr = float(group.get("lr", lr))
            wd = float(group.get("weight_decay", 0.0)) or float(group.get("shifted_wd", 0.0))
            w_norm, g_norm = torch.linalg.vector_norm(x), torch.linalg.vector_norm(g)
            xa = x.abs()
            a = int(xa.argmax())
            w_max = xa.flatten()[a]
            g_at = g.flatten()[a].abs()
            rec: dict[str, Any] = {"w_norm": w_norm, "w_max": w_max, "g_norm": g_norm,
                                   "grad_at_max": g_at}
            mean_g = torch.linalg.vector_norm(g, 1) / g.numel()  # mean |g| without a temporary
            if g_norm > 0:
                rec["w_over_g"] = w_norm / g_norm
                rec["grad_max_ratio"] = g_at / mean_g
            if self.optimizer_name == "sgd" and wd > 0 and self.momentum < 1:
                rec["equilibrium"] = math.sqrt(glr / (2 * wd * (1 - self.momentum)))
            if self.optimizer_name == "sgd":
                rec["eff_lr"] = glr / w_norm ** 2
            elif self.optimizer_name == "lars":
                ratio = 1.0
                if w_norm > 0 and g_norm > 0 and group.get("trust", False):
                    lwd = float(group.get("weight_decay", 0.0))  # the ratio LARS itself uses
                    ratio = group["trust_coefficient"] * w_norm / (g_norm + lwd * w_norm)
                rec["eff_lr"] = glr * ratio / w_norm ** 2
            else:
                rec["eff_lr"] = glr * math.sqrt(x.numel()) / w_norm
            if getattr(p, "name", "") == "layer-max" and not getattr(p, "weight_bits", None):
                at_unit = xa >= (1 - UNIT_TOL) * w_max  # |W/m| >= 1 - tol without the divide
            else:
                at_unit = p.normalize(x).abs() >= 1 - UNIT_TOL
            rec["frac_at_unit"] = torch.count_nonzero(at_unit) / at_unit.numel()
            bits = getattr(p, "weight_bits", None)
            if bits:
                levels[name] = self._levels(p, x, int(bits))
            before[name] = x.clone() if w.dtype == torch.float32 else x
            layers[name] = rec
        self._pending = {"step": step, "epoch": epoch, "lr": lr, "layers": layers,
                         "before": before, "levels": levels}
        if self._batch is not None:
            self._pending["activations"] = activation_diagnostics(self.model, self._batch)

    def _remember(self, module: nn.Module, args: tuple) -> None:
        if module.training:
            self._batch = args[0].detach()

    @staticmethod
    def _levels(p: nn.Module, x: Tensor, bits: int) -> Tensor:
        q = 2 ** (bits - 1) - 1
        return torch.round(p.normalize(x).clamp(-1, 1) * q)

    @torch.no_grad()
    def after_step(self) -> None:
        pend, self._pending = self._pending, None
        if pend is None:
            return
        for name, w, p in self.layers:
            if name not in pend["layers"]:
                continue
            rec = pend["layers"][name]
            x0, x1 = pend["before"][name], w.detach().float()
            # Angle from the update d = x1 - x0: tan = |d_perp| / (|x0| + <d, x0>/|x0|), accurate
            # for tiny steps where arccos(cos) would lose most digits.
            n0 = torch.linalg.vector_norm(x0)
            if n0 > 0:
                d = (x1 - x0).flatten()
                along = torch.dot(d, x0.flatten()) / n0
                perp = (torch.linalg.vector_norm(d) ** 2 - along ** 2).clamp_min(0).sqrt()
                rec["angle"] = torch.atan2(perp, n0 + along)
            if name in pend["levels"]:
                bits = int(getattr(p, "weight_bits"))
                rec["grid_changed"] = (self._levels(p, x1, bits) != pend["levels"][name]).float().mean()
        record = {"step": pend["step"], "epoch": pend["epoch"], "lr": pend["lr"],
                  "optimizer": self.optimizer_name,
                  "layers": {k: {f: _f(v) for f, v in r.items()} for k, r in pend["layers"].items()}}
        if "activations" in pend:
            record["activations"] = {k: {f: _f(v) for f, v in r.items()}
                                     for k, r in pend["activations"].items()}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_dynamics(path: Path) -> list[dict]:
    """The records of a ``dynamics.jsonl`` (a torn last line after a crash is skipped)."""
    return read_jsonl(path)
