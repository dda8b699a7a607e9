"""Register a scheme's parametrization on every conv/linear weight of a model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .layout import ChannelLayout
from .schemes import SCHEMES, Reparam, SchemeConfig
from .weights import WeightRef, excluded, iter_weights


@dataclass
class ApplyReport:
    scheme: str
    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "applied": self.applied, "skipped": self.skipped}


def apply_scheme(model: nn.Module, config: SchemeConfig) -> ApplyReport:
    """Reparametrize ``model`` in place. The model computes the same function afterwards
    (up to rounding) unless ``config.gain == 'none'`` or the scheme is weight-std without gain."""
    report = ApplyReport(config.scheme)
    cls = SCHEMES[config.scheme]
    for ref, module in list(iter_weights(model)):
        if parametrize.is_parametrized(module, ref.tensor_name):
            raise ValueError(f"{ref.qualname} is already reparametrized")
        if cls is None:
            report.skipped[ref.qualname] = "scheme none"
            continue
        why = excluded(ref, module, config.exclude, config.skip_depthwise)
        if why:
            report.skipped[ref.qualname] = why
            continue
        weight = getattr(module, ref.tensor_name)
        extra = {"weight_bits": config.weight_bits} if getattr(config, "weight_bits", None) else {}
        reparam = cls(weight, ChannelLayout.of(module), gain=config.gain, scale_grad=config.scale_grad,
                      **extra)
        reparam.to(device=weight.device)
        parametrize.register_parametrization(module, ref.tensor_name, reparam)
        report.applied.append(ref.qualname)
    return report


def reparam_of(module: nn.Module, tensor_name: str) -> Reparam | None:
    """The scheme parametrization on ``module.<tensor_name>``, if any."""
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    for p in module.parametrizations[tensor_name]:
        if isinstance(p, Reparam):
            return p
    return None


def raw_weight(module: nn.Module, tensor_name: str) -> Tensor:
    """The trained tensor W (the parametrization's ``original``), or the plain weight."""
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return getattr(module, tensor_name)


def reparametrized(model: nn.Module) -> list[tuple[WeightRef, nn.Module, Reparam]]:
    """All ``(ref, module, parametrization)`` triples of a reparametrized model."""
    out = []
    for ref, module in iter_weights(model):
        p = reparam_of(module, ref.tensor_name)
        if p is not None:
            out.append((ref, module, p))
    return out


def scheme_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(raw reparametrized weights, gains/offsets)`` for optimizer grouping."""
    weights, affine = [], []
    for ref, module, p in reparametrized(model):
        weights.append(raw_weight(module, ref.tensor_name))
        affine.extend(p.parameters())
    return weights, affine


@torch.no_grad()
def max_step0_deviation(before: Tensor, after: Tensor) -> float:
    """Relative max deviation of two outputs, for the step-0 report."""
    denom = before.abs().max().clamp_min(1e-30)
    return float((after - before).abs().max() / denom)
