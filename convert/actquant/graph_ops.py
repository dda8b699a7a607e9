"""How the torch operations of a traced model map onto the integer graph: which are quantized
layers, BatchNorm, ReLU, residual adds, concatenations, pooling, pass-throughs of integers, and
which have no integer form and stay in float under mixed precision. One table, read by the graph
capture (prepare.py) and by the QDQ writer (export_qdq.py).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import StochasticDepth

LAYER_TYPES = (nn.Conv2d, nn.Linear)
BN_TYPES = (nn.BatchNorm2d, nn.BatchNorm1d)
ADD = (operator.add, operator.iadd, torch.add)
CAT = (torch.cat, torch.concat)
RELU_FN = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
RELU_MOD = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
MAXPOOL = (nn.MaxPool2d,)
AVGPOOL = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
AVGPOOL_FN = (F.avg_pool2d, F.adaptive_avg_pool2d)
PASS_MOD = (nn.Dropout, nn.Identity, nn.Flatten, StochasticDepth) + MAXPOOL  # the last: identity in eval
PASS_FN = (torch.flatten, F.dropout, F.max_pool2d)
PASS_METHOD = ("flatten", "view", "reshape")
# Operations kept in float under mixed precision: op name -> whether its output is non-negative
# whatever its input (a sigmoid's is; a multiply's is when both factors are).
FLOAT_OPS = {"hardswish": False, "hardsigmoid": True, "silu": False, "sigmoid": True, "gelu": False,
             "tanh": False, "mul": None}
FLOAT_MOD = {nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.SiLU: "silu", nn.Sigmoid: "sigmoid",
             nn.GELU: "gelu", nn.Tanh: "tanh"}
FLOAT_FN = {F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.silu: "silu", torch.sigmoid: "sigmoid",
            F.sigmoid: "sigmoid", F.gelu: "gelu", torch.tanh: "tanh", F.tanh: "tanh",
            operator.mul: "mul", torch.mul: "mul"}
FLOAT_METHOD = {"sigmoid": "sigmoid", "tanh": "tanh", "mul": "mul"}


def op_name(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    return getattr(n.target, "__name__", str(n.target))


def module_of(gm: fx.GraphModule, n: fx.Node, types) -> nn.Module | None:
    if n.op != "call_module":
        return None
    m = gm.get_submodule(n.target)
    return m if isinstance(m, types) else None


def relu_kind(gm: fx.GraphModule, n: fx.Node) -> str | None:
    if n.op == "call_module":
        return RELU_MOD.get(type(gm.get_submodule(n.target)))
    if n.op == "call_function":
        return RELU_FN.get(n.target)
    if n.op == "call_method" and n.target in ("relu", "relu_"):
        return "relu"
    return None


def float_op(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """The :data:`FLOAT_OPS` name of node ``n`` of ``gm``, or None when it is not one of them."""
    if n.op == "call_module":
        return FLOAT_MOD.get(type(gm.get_submodule(n.target)))
    if n.op == "call_function":
        return FLOAT_FN.get(n.target)
    if n.op == "call_method":
        return FLOAT_METHOD.get(n.target)
    return None


def sole_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def is_passthrough(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), PASS_MOD)
    if n.op == "call_function":
        return n.target in PASS_FN
    return n.op == "call_method" and n.target in PASS_METHOD
