"""Per-tensor weight ranges of an ONNX file or a state_dict file, for ``wnconvert inspect``."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserInputError
from .onnx_ranges import load_model, weight_ranges


def is_weight_key(key: str, tensor: torch.Tensor) -> bool:
    """Conv/linear/attention weights: tensors of two or more dims named like a weight."""
    last = key.rsplit(".", 1)[-1]
    return tensor.dim() >= 2 and (last in ("weight", "original") or last.endswith("proj_weight"))


def onnx_rows(path: Path) -> list[dict]:
    return [{"name": r.initializer, "node": r.node, "op": r.op, "shape": r.shape,
             "max_abs": r.max_abs, "via": r.via, "in_unit_range": r.in_unit_range}
            for r in weight_ranges(load_model(path))]


def state_rows(state: dict[str, torch.Tensor]) -> list[dict]:
    rows = []
    for key, t in state.items():
        if is_weight_key(key, t):
            m = float(t.detach().abs().max()) if t.numel() else 0.0
            rows.append({"name": key, "shape": list(t.shape), "max_abs": m, "in_unit_range": m <= 1.0})
    return rows


def inspect_file(path: Path, load_state) -> list[dict]:
    """Rows for an ``.onnx`` file, or for a state_dict file read with ``load_state(path)``."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path} does not exist")
    if path.suffix == ".onnx":
        return onnx_rows(path)
    return state_rows(load_state(path))
