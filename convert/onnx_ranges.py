"""Ranges of the weights an ONNX graph feeds to its Conv, ConvTranspose, Gemm and MatMul nodes.

A weight operand is followed backwards through value-preserving ops (Identity, Transpose,
Reshape, ...) to the initializer it comes from. ``Mul(stored, scale)`` of two constants is the
explicit weight-side scale of :mod:`.scaled`: the larger operand is the stored weight. Any other
arithmetic on constants means a weight was computed in the graph (e.g. an exporter folded a
scale or a BatchNorm back in) and is reported as such.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import RangeError, UserInputError

WEIGHT_OPS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1)}
PASS_THROUGH = {"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast",
                "Slice", "Split", "Gather", "Expand"}
UNIT_TOL = 0.0  # stored weights must be in [-1, 1] exactly


@dataclass
class WeightRange:
    node: str
    op: str
    initializer: str
    shape: list[int]
    max_abs: float
    via: str          # "direct", "weight-side Mul", or "computed in graph"

    @property
    def in_unit_range(self) -> bool:
        return self.via != "computed in graph" and self.max_abs <= 1.0 + UNIT_TOL


def load_model(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except FileNotFoundError:
        raise UserInputError(f"{path} does not exist") from None
    except Exception as e:
        raise UserInputError(f"{path} is not a readable ONNX file ({type(e).__name__})") from None


def weight_ranges(model: onnx.ModelProto) -> list[WeightRange]:
    graph = model.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    origin = _constant_origins(graph, consts)

    out = []
    for node in graph.node:
        idx = _weight_operand(node, origin)
        if idx is not None:
            init, how = origin[node.input[idx]]
            arr = consts.get(init)
            max_abs = float(np.abs(arr).max()) if arr is not None and arr.size else float("nan")
            shape = list(arr.shape) if arr is not None else []
            out.append(WeightRange(node.name or node.output[0], node.op_type, init, shape, max_abs, how))
    return out


def _weight_operand(node, origin) -> int | None:
    """Index of the weight input of a Conv/ConvTranspose/Gemm/MatMul, None if it has none.

    Conv takes its weight second. A Gemm or MatMul from ``nn.Linear`` does too (``x @ W^T``);
    its first operand is the weight only when the second is an activation (``P @ x``). When both
    are constant (a layer applied to a constant table, as in Swin V2's position bias) the first
    one is data, not a weight.
    """
    candidates = WEIGHT_OPS.get(node.op_type, ())
    constant = [i for i in candidates if i < len(node.input) and node.input[i] in origin]
    if not constant:
        return None
    return 1 if 1 in constant else constant[0]


def _constant_origins(graph, consts: dict[str, np.ndarray]) -> dict[str, tuple[str, str]]:
    """For every value computed from constants only: ``(source initializer, how)``.

    One pass in the graph's topological order (ONNX requires it), so deep and residual graphs
    cost one visit per node.
    """
    origin = {name: (name, "direct") for name in consts}
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        ins = [i for i in node.input if i]
        if not ins:
            continue
        if node.op_type in PASS_THROUGH:
            if ins[0] not in origin:
                continue
            found = origin[ins[0]]
        else:
            if any(i not in origin for i in ins):
                continue
            found = (origin[ins[0]][0], "computed in graph")
            if node.op_type == "Mul" and len(ins) == 2:
                big = max((origin[i] for i in ins), key=lambda o: consts[o[0]].size)
                if big[1] == "direct":
                    found = (big[0], "weight-side Mul")
        for o in node.output:
            origin[o] = found
    return origin


def check_unit_range(ranges: list[WeightRange], what: str) -> None:
    bad = [r for r in ranges if not r.in_unit_range]
    if bad:
        worst = max(bad, key=lambda r: r.max_abs if r.max_abs == r.max_abs else float("inf"))
        raise RangeError(f"{what}: {len(bad)} weight tensor(s) outside [-1, 1] "
                         f"(worst {worst.initializer}: max|w|={worst.max_abs:.6g}, {worst.via})")


def ranges_to_dicts(ranges: list[WeightRange]) -> list[dict]:
    return [asdict(r) | {"in_unit_range": r.in_unit_range} for r in ranges]
