"""Fold a reparametrized model into a plain one whose stored conv/linear weights lie in [-1, 1].

For every conv/linear weight the fold takes ``stored, scale`` with ``stored * scale`` equal to the
effective weight (the scheme's own split, or ``W / max|W|`` for layers without a scheme), writes
``stored`` into the layer and puts the scale where it is exact:

``bn='keep'``  the scale (and the layer's bias) goes into the BatchNorm that is the layer's sole
              consumer:  ``gamma' = gamma * s``, ``mean' = (mean - b) / s``. Elsewhere it stays an
              explicit multiply (see :mod:`.scaled`).
``bn='fold'``  that BatchNorm is folded into the layer instead (``W' = W * gamma / sigma``,
              ``b' = (b - mean) * gamma / sigma + beta``), the result re-normalized per tensor or
              per channel, and the BatchNorm replaced by ``nn.Identity``.

The source model is never modified. The result comes with a per-layer certificate.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .apply import reparam_of
from .configs import FoldConfig  # noqa: F401 (re-exported)
from .layout import ChannelLayout, safe_divisor
from .scaled import add_output_scale, add_weight_scale, has_weight_scales, stored_tensor, strip_parametrizations
from .topology import Topology, first_tensor, probe
from .weights import WEIGHTED_TYPES, WeightRef, iter_weights


@dataclass
class LayerCertificate:
    layer: str
    scheme: str
    stored_max_abs: float
    scale: str           # where the scale went
    compared_at: str     # the module whose output was compared
    max_abs_diff: float
    rel_diff: float


@dataclass
class FoldResult:
    model: nn.Module
    layers: list[LayerCertificate] = field(default_factory=list)
    weight_side_scales: bool = False

    @property
    def max_stored(self) -> float:
        return max((c.stored_max_abs for c in self.layers), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((c.rel_diff for c in self.layers), default=0.0)

    def certificate(self) -> list[dict]:
        return [asdict(c) for c in self.layers]


def unit_split(weight: Tensor, layout: ChannelLayout, granularity: str) -> tuple[Tensor, Tensor]:
    """``weight = stored * scale`` with ``max|stored| == 1`` per tensor or per output channel."""
    if granularity == "tensor":
        scale = weight.abs().amax()
        return weight / safe_divisor(scale), scale
    scale = layout.amax(weight)
    return layout.div(weight, safe_divisor(scale)), scale


@torch.no_grad()
def fold_model(model: nn.Module, example_input: Tensor, config: FoldConfig = FoldConfig()) -> FoldResult:
    was_training = model.training
    model.eval()
    try:
        return _fold(model, example_input, config)
    finally:
        model.train(was_training)


def _fold(model: nn.Module, example_input: Tensor, config: FoldConfig) -> FoldResult:
    work = copy.deepcopy(model)
    plan: dict[WeightRef, tuple[str, Tensor, Tensor]] = {}
    for ref, module in list(iter_weights(work)):
        p = reparam_of(module, ref.tensor_name)
        if p is not None:
            stored, scale = p.unit_parts(module.parametrizations[ref.tensor_name].original)
            plan[ref] = (p.name, stored, scale)
        else:
            plan[ref] = ("none", *unit_split(getattr(module, ref.tensor_name).detach(),
                                                ChannelLayout.of(module), config.granularity))
    for module in work.modules():
        strip_parametrizations(module)
    for p in work.parameters():
        p.requires_grad_(False)

    topo = probe(work, example_input)
    placements: dict[WeightRef, tuple[str, str]] = {}
    for ref, (_, stored, scale) in plan.items():
        module = work.get_submodule(ref.module_name)
        placements[ref] = _place(work, ref, module, stored, scale, topo, config)

    layers = _certify(model, work, example_input, plan, placements)
    return FoldResult(work, layers, has_weight_scales(work))


def _place(work: nn.Module, ref: WeightRef, module: nn.Module, stored: Tensor, scale: Tensor,
           topo: Topology, config: FoldConfig) -> tuple[str, str]:
    """Write ``stored`` into ``module`` and put ``scale`` somewhere exact.

    Returns ``(where the scale went, module to compare outputs at)``.
    """
    layout = ChannelLayout.of(module)
    name = ref.module_name
    is_layer = isinstance(module, WEIGHTED_TYPES)
    bn_name = topo.bn_after.get(name) if is_layer else None
    if not is_layer or not topo.called(name):
        _set(module, ref.tensor_name, stored)
        add_weight_scale(module, ref.tensor_name, scale, layout)
        return "weight-side Mul", topo.nearest_called(name)

    channels = layout.num_channels(stored)
    bias = module.bias.detach().clone() if module.bias is not None else None
    if bn_name is not None and config.bn == "fold":
        bn = work.get_submodule(bn_name)
        effective = _scaled(stored, scale, layout)
        inv_sigma = torch.rsqrt(bn.running_var.double() + bn.eps)
        factor = (bn.weight.double() * inv_sigma)
        b = bias.double() if bias is not None else torch.zeros_like(factor)
        new_w = layout.mul(effective.double(), factor).to(stored.dtype)
        new_b = ((b - bn.running_mean.double()) * factor + bn.bias.double()).to(stored.dtype)
        stored, scale = unit_split(new_w, layout, config.granularity)
        _set(module, ref.tensor_name, stored)
        module.bias = None
        add_output_scale(module, scale, new_b)
        _replace(work, bn_name, nn.Identity())
        return f"folded {bn_name}, output Mul", bn_name
    _set(module, ref.tensor_name, stored)
    module.bias = None
    if bn_name is not None:
        _absorb_into_bn(work.get_submodule(bn_name), scale.expand(channels), bias)
        return f"absorbed into {bn_name}", bn_name
    add_output_scale(module, scale, bias)
    return "output Mul", name


def _scaled(stored: Tensor, scale: Tensor, layout: ChannelLayout) -> Tensor:
    return stored * scale if scale.dim() == 0 else layout.mul(stored, scale)


def _absorb_into_bn(bn: nn.Module, scale: Tensor, bias: Tensor | None) -> None:
    """Make ``bn(z)`` equal the old ``bn(scale * z + bias)`` by editing gamma, beta and mean."""
    s = scale.double()
    gamma, beta, mean = bn.weight.double(), bn.bias.double(), bn.running_mean.double()
    b = bias.double() if bias is not None else torch.zeros_like(mean)
    sigma = torch.sqrt(bn.running_var.double() + bn.eps)
    dead = s == 0
    safe_s = torch.where(dead, torch.ones_like(s), s)
    new_gamma = torch.where(dead, torch.zeros_like(s), gamma * s)
    new_mean = torch.where(dead, torch.zeros_like(s), (mean - b) / safe_s)
    new_beta = torch.where(dead, beta + gamma * (b - mean) / sigma, beta)
    bn.weight.copy_(new_gamma.to(bn.weight.dtype))
    bn.bias.copy_(new_beta.to(bn.bias.dtype))
    bn.running_mean.copy_(new_mean.to(bn.running_mean.dtype))


def _set(module: nn.Module, tensor_name: str, value: Tensor) -> None:
    module.register_parameter(tensor_name, nn.Parameter(value.detach().clone(), requires_grad=False))


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _certify(reference: nn.Module, folded: nn.Module, x: Tensor, plan, placements) -> list[LayerCertificate]:
    points = sorted({at for _, at in placements.values()})
    ref_out = _capture(reference, x, points)
    new_out = _capture(folded, x, points)
    certs = []
    for ref, (scheme, _, _) in plan.items():
        where, at = placements[ref]
        module = folded.get_submodule(ref.module_name)
        stored = stored_tensor(module, ref.tensor_name)
        r, n = ref_out.get(at), new_out.get(at)
        if r is None or n is None or r.shape != n.shape:
            diff, rel = float("nan"), float("nan")
        else:
            diff = float((n.double() - r.double()).abs().max())
            rel = diff / max(float(r.double().abs().max()), 1e-30)
        certs.append(LayerCertificate(ref.qualname, scheme, float(stored.abs().max()),
                                      where, at or "<model>", diff, rel))
    return certs


def _capture(model: nn.Module, x: Tensor, names: list[str]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name) if name else model

        def hook(mod, args, result, name=name):
            t = first_tensor(result)
            if t is not None and name not in out:
                out[name] = t.detach()
        handles.append(module.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return out
