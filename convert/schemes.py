"""Weight-range reparametrizations, one ``torch.nn.utils.parametrize`` module per scheme.

A scheme maps the raw trained tensor ``W`` to a normalized tensor ``N(W)``; the layer then uses the
effective weight ``gain * N(W)`` (plus, for weight-std, a frozen per-channel offset). The gain is
initialised from the weight the scheme is applied to, so that right after ``apply`` the model
computes what it computed before.

Every scheme also knows how to split its effective weight into ``stored * scale`` with
``|stored| <= 1`` (:meth:`Reparam.unit_parts`): that is what the fold writes into the static model.

Schemes, per output channel ``c`` unless noted (rows as in :mod:`.layout`):

* ``layer-max``:   N = W / max|W|            (one scale for the whole tensor)
* ``channel-max``: N = W / max|W_c|
* ``weight-norm``: N = W / ||W_c||
* ``weight-std``:  N = (W - mean(W_c)) / sqrt(var(W_c) + eps)
* ``none``:        no reparametrization (the fold still normalizes the stored weights).

The max schemes with ``weight_bits`` also take ``weight_range='learned'`` (``--weight-range
learned``): ``N = q(clamp(W / (alpha · max|W|), -1, 1))`` with a learned clip ratio ``alpha``
(:mod:`.clip`), effective weight ``gain · alpha · N``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .clip import LearnedClip, clipped_unit
from .configs import SchemeConfig  # noqa: F401 (re-exported)
from .fakequant import fake_quant
from .layout import ChannelLayout, safe_divisor
from .names import GAIN_MODES, SCALE_GRAD_MODES

WS_EPS = 1e-10  # small: pretrained rows can have variances near 1e-6, a larger eps would distort N


class Reparam(nn.Module):
    """Base parametrization: ``forward(W) = gain * N(W)``."""

    name: str = ""
    per_channel: bool = True

    def __init__(self, weight: Tensor, layout: ChannelLayout, gain: str = "frozen",
                 scale_grad: str = "full", weight_bits: int | None = None,
                 weight_range: str = "max") -> None:
        super().__init__()
        if gain not in GAIN_MODES:
            raise ValueError(f"gain must be one of {GAIN_MODES}, not {gain!r}")
        if scale_grad not in SCALE_GRAD_MODES:
            raise ValueError(f"scale_grad must be one of {SCALE_GRAD_MODES}, not {scale_grad!r}")
        self.layout = layout
        self.gain_mode = gain
        self.detach_scale = scale_grad == "detach"
        self.weight_bits = weight_bits  # fake-quantize N(W) to this grid (max schemes only)
        with torch.no_grad():
            init = self.initial_gain(weight.detach())
        self._register_affine("gain", init if gain != "none" else None)
        self.clip: LearnedClip | None = None
        if weight_range == "learned":  # max schemes on a grid only (SchemeConfig checks it)
            shape = (layout.num_channels(weight),) if self.per_channel else ()
            self.clip = LearnedClip(shape, device=weight.device)

    # -- to be provided by each scheme -------------------------------------------------------
    def normalize(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def initial_gain(self, weight: Tensor) -> Tensor:
        """The gain that makes ``gain * N(weight) == weight``."""
        raise NotImplementedError

    # -- shared machinery --------------------------------------------------------------------
    def _register_affine(self, name: str, value: Tensor | None) -> None:
        if value is None:
            setattr(self, name, None)
        elif self.gain_mode == "learned":
            setattr(self, name, nn.Parameter(value.clone()))
        else:
            self.register_buffer(name, value.clone())

    def _scale(self, s: Tensor) -> Tensor:
        return s.detach() if self.detach_scale else s

    def scale_tensor(self) -> Tensor | None:
        """The differentiable factor of ``N(W)``: the gain, times the clip ratio of a learned range
        (None: no factor)."""
        clip = getattr(self, "clip", None)
        if clip is None:
            return self.gain
        alpha = clip.ratio()
        return alpha if self.gain is None else self.gain * alpha.to(self.gain.dtype)

    def _apply_gain(self, n: Tensor) -> Tensor:
        g = self.scale_tensor()
        if g is None:
            return n
        if self.per_channel:
            return self.layout.mul(n, g)
        return n * g

    def forward(self, weight: Tensor) -> Tensor:
        return self._apply_gain(self.normalize(weight))

    def scale_vector(self, weight: Tensor) -> Tensor:
        """Gain as a tensor: scalar for per-tensor schemes, ``[out_channels]`` otherwise."""
        g = self.scale_tensor()
        if g is not None:
            return g.detach()
        shape = (self.layout.num_channels(weight),) if self.per_channel else ()
        return torch.ones(shape, dtype=weight.dtype, device=weight.device)

    @torch.no_grad()
    def unit_parts(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``(stored, scale)`` with ``|stored| <= 1`` and ``stored * scale == forward(weight)``.

        ``scale`` is a 0-dim tensor (per tensor) or a ``[out_channels]`` vector.
        For the max schemes ``stored`` is exactly ``N(W)``, the tensor the network trained with.
        """
        return self.normalize(weight), self.scale_vector(weight)

    def extra_repr(self) -> str:
        bits = f", weight_bits={self.weight_bits}" if getattr(self, "weight_bits", None) else ""
        bits += ", weight_range=learned" if getattr(self, "clip", None) is not None else ""
        return f"gain={self.gain_mode}, scale_grad={'detach' if self.detach_scale else 'full'}{bits}"

    def _fake_quant(self, n: Tensor) -> Tensor:
        bits = getattr(self, "weight_bits", None)
        return fake_quant(n, bits) if bits else n

    def _max_unit(self, weight: Tensor, m: Tensor) -> Tensor:
        """``q(W / m)``, or with a learned range ``q(clamp(W / (alpha · m), -1, 1))``."""
        clip = getattr(self, "clip", None)
        if clip is None:
            if self.per_channel:
                return self._fake_quant(self.layout.div(weight, safe_divisor(m)))
            return self._fake_quant(weight / safe_divisor(m))
        divisor = safe_divisor(m) * clip.ratio().to(weight.dtype)
        return self._fake_quant(clipped_unit(weight, divisor, self.layout, self.per_channel))


class LayerMax(Reparam):
    name = "layer-max"
    per_channel = False

    def normalize(self, weight: Tensor) -> Tensor:
        return self._max_unit(weight, self._scale(weight.abs().amax()))

    def initial_gain(self, weight: Tensor) -> Tensor:
        return weight.abs().amax()


class ChannelMax(Reparam):
    name = "channel-max"

    def normalize(self, weight: Tensor) -> Tensor:
        return self._max_unit(weight, self._scale(self.layout.amax(weight)))

    def initial_gain(self, weight: Tensor) -> Tensor:
        return self.layout.amax(weight)


class _RenormalizedParts(Reparam):
    """Schemes whose ``N(W)`` is not bounded by one: the fold divides by its per-channel max."""

    @torch.no_grad()
    def unit_parts(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        effective = self.forward(weight)
        m = self.layout.amax(effective)
        return self.layout.div(effective, safe_divisor(m)), m


class WeightNorm(_RenormalizedParts):
    name = "weight-norm"

    def normalize(self, weight: Tensor) -> Tensor:
        norm = self._scale(torch.linalg.vector_norm(self.layout.rows(weight), dim=1))
        return self.layout.div(weight, safe_divisor(norm))

    def initial_gain(self, weight: Tensor) -> Tensor:
        return torch.linalg.vector_norm(self.layout.rows(weight), dim=1)


class WeightStd(_RenormalizedParts):
    """Weight Standardization with a function-preserving gain and offset.

    Standardizing removes each channel's mean, which no gain can restore. Unless ``gain='none'``
    the effective weight is ``gain_c * N(W)_c + offset_c`` with ``gain = sqrt(var + eps)`` and
    ``offset = mean`` of the weight at apply time, so fine-tuning starts from the pretrained
    function; the offset follows the gain mode (frozen buffer or learned parameter). With
    ``gain='none'`` the layer is the raw standardization and the step-0 deviation is reported.
    """

    name = "weight-std"

    def __init__(self, weight: Tensor, layout: ChannelLayout, gain: str = "frozen",
                 scale_grad: str = "full") -> None:
        super().__init__(weight, layout, gain, scale_grad)
        offset = None
        if gain != "none":
            offset = self.layout.rows(weight.detach()).mean(dim=1)
        self._register_affine("offset", offset)

    def _stats(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        var, mean = torch.var_mean(self.layout.rows(weight), dim=1, unbiased=False)
        return var, mean

    def normalize(self, weight: Tensor) -> Tensor:
        var, mean = self._stats(weight)
        std = self._scale(torch.sqrt(var + WS_EPS))
        mean = self._scale(mean)
        centered = weight - _expand(self.layout, mean, weight)
        return self.layout.div(centered, std)

    def initial_gain(self, weight: Tensor) -> Tensor:
        var, _ = self._stats(weight)
        return torch.sqrt(var + WS_EPS)

    def forward(self, weight: Tensor) -> Tensor:
        out = self._apply_gain(self.normalize(weight))
        if self.offset is not None:
            out = out + _expand(self.layout, self.offset, weight)
        return out


def _expand(layout: ChannelLayout, per_channel: Tensor, like: Tensor) -> Tensor:
    """A tensor shaped like ``like`` whose every element is ``per_channel`` of its channel."""
    return layout.mul(torch.ones_like(like), per_channel)


@dataclass(frozen=True)
class SchemeInfo:
    """One entry of the scheme registry: everything the rest of wnconvert asks about a scheme."""

    reparam: type[Reparam] | None   # None: no reparametrization
    help: str                       # what ``wnconvert schemes`` and ``--help`` say

    @property
    def per_channel(self) -> bool:
        """One scale per output channel (False: one per tensor). ``none`` has no scale of its own;
        weights-only files default to per-channel scales for it, as for the others."""
        return self.reparam is None or self.reparam.per_channel


# A new scheme: a Reparam subclass above, one entry here and its name in names.SCHEME_NAMES (and in
# names.WEIGHT_BITS_SCHEMES, the one statement of which schemes train on a --weight-bits grid, if its
# range is the fixed [-1, 1]).
REGISTRY: dict[str, SchemeInfo] = {
    "layer-max": SchemeInfo(LayerMax, "W / max|W| over the whole tensor; one scale per layer"),
    "channel-max": SchemeInfo(ChannelMax, "W / max|W_c| per output channel"),
    "weight-std": SchemeInfo(WeightStd, "(W - mean_c) / std_c per output channel (Weight Standardization)"),
    "weight-norm": SchemeInfo(WeightNorm, "W / ||W_c|| per output channel (Weight Normalization)"),
    "none": SchemeInfo(None, "no reparametrization (baseline); the fold still stores weights in [-1, 1]"),
}

SCHEMES: dict[str, type[Reparam] | None] = {k: v.reparam for k, v in REGISTRY.items()}
SCHEME_HELP = {k: v.help for k, v in REGISTRY.items()}
