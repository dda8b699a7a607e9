"""Which weight tensors of a model the schemes and the fold act on."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterator

from torch import nn
from torch.nn.utils import parametrize

WEIGHTED_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class WeightRef:
    """One weight tensor: ``getattr(model.get_submodule(module_name), tensor_name)``."""

    module_name: str
    tensor_name: str

    @property
    def qualname(self) -> str:
        return f"{self.module_name}.{self.tensor_name}" if self.module_name else self.tensor_name


def is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and module.groups == module.in_channels)


def weight_tensor_names(module: nn.Module) -> list[str]:
    """Weight tensors of ``module`` itself (not of its children) that schemes apply to."""
    if isinstance(module, WEIGHTED_TYPES):
        return ["weight"]
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    return []


def iter_weights(model: nn.Module) -> Iterator[tuple[WeightRef, nn.Module]]:
    """Every conv / linear / attention-projection weight, in module order."""
    for name, module in model.named_modules():
        for tensor in weight_tensor_names(module):
            if _has_tensor(module, tensor):
                yield WeightRef(name, tensor), module


def excluded(ref: WeightRef, module: nn.Module, patterns: tuple[str, ...],
             skip_depthwise: bool) -> str | None:
    """Why ``ref`` is left alone, or None when it is reparametrized."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(ref.module_name, pattern) or fnmatch.fnmatchcase(ref.qualname, pattern):
            return f"excluded by pattern {pattern!r}"
    if skip_depthwise and is_depthwise(module):
        return "depthwise conv skipped"
    return None


def _has_tensor(module: nn.Module, name: str) -> bool:
    if parametrize.is_parametrized(module, name):
        return True
    t = getattr(module, name, None)
    return t is not None and t.numel() > 0
