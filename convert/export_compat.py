"""Exact, exportable stand-ins for ops the ONNX exporter rejects at a given input size.

``AdaptiveAvgPool2d`` exports only when the input size is a multiple of the output size
(AlexNet's 6x6 and VGG's 7x7 pools fail for small images). At a fixed input size an adaptive
average pool is a fixed linear map on each spatial axis, ``Y = P_h X P_w^T``, with ``P[i, j]`` the
averaging weight of input ``j`` in output cell ``i``, which exports as two MatMuls. The ONNX has
a fixed spatial size anyway; only the batch is dynamic.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def pooling_matrix(n_in: int, n_out: int) -> Tensor:
    """Rows: output cells; the PyTorch rule: cell i covers [floor(i*n/m), ceil((i+1)*n/m))."""
    p = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        p[i, start:end] = 1.0 / (end - start)
    return p


class FixedAdaptiveAvgPool2d(nn.Module):
    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("ph", pooling_matrix(in_hw[0], out_hw[0]))
        self.register_buffer("pw", pooling_matrix(in_hw[1], out_hw[1]).t().contiguous())

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(torch.matmul(self.ph, x), self.pw)


def _out_size(module: nn.AdaptiveAvgPool2d, in_hw: tuple[int, int]) -> tuple[int, int]:
    size = module.output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return tuple(in_hw[i] if s is None else s for i, s in enumerate(size))


@torch.no_grad()
def make_exportable(model: nn.Module, example_input: Tensor) -> nn.Module:
    """``model`` itself if nothing needs replacing, else a copy with the stand-ins in place."""
    seen: dict[str, tuple[int, int]] = {}

    def record(name):
        def hook(mod, args, out):
            seen.setdefault(name, tuple(args[0].shape[-2:]))  # returns None: output unchanged
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in model.named_modules()
               if isinstance(m, nn.AdaptiveAvgPool2d)]
    try:
        model(example_input)
    finally:
        for h in handles:
            h.remove()
    todo = {n: hw for n, hw in seen.items()
            if any(i % o for i, o in zip(hw, _out_size(model.get_submodule(n), hw)))}
    if not todo:
        return model
    model = copy.deepcopy(model)
    for name, hw in todo.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FixedAdaptiveAvgPool2d(hw, _out_size(getattr(parent, child), hw)))
    return model
