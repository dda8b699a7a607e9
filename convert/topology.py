"""What feeds what, found by running the model once.

The fold may move a layer's scale into the BatchNorm after it only when that BatchNorm is the sole
consumer of the layer's output; anything else (a residual add reading the same tensor, a view in
between, a layer called twice) would make the move inexact. Module hooks cannot see functional
consumers such as ``x + identity``, but the autograd graph can: every use of a tensor is an edge
from its ``grad_fn``. So the probe records each module's input and output ``grad_fn`` and counts the
edges into every node of the graph.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .weights import WEIGHTED_TYPES


@dataclass
class Topology:
    calls: Counter = field(default_factory=Counter)     # module name -> number of calls
    bn_after: dict[str, str] = field(default_factory=dict)  # layer name -> sole-consumer BN name

    def called(self, name: str) -> bool:
        return self.calls[name] > 0

    def nearest_called(self, name: str) -> str:
        """``name`` or its closest ancestor that ran in the probe ('' is the model itself)."""
        while name and not self.called(name):
            name = name.rpartition(".")[0]
        return name


def first_tensor(obj) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            t = first_tensor(item)
            if t is not None:
                return t
    if isinstance(obj, dict):
        for item in obj.values():
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def _all_tensors(obj) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _all_tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _all_tensors(item)]
    return []


def _edge_counts(roots: list) -> Counter:
    counts: Counter = Counter()
    seen = set()
    stack = [r for r in roots if r is not None]
    for r in stack:
        counts[r] += 1
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                counts[nxt] += 1
                stack.append(nxt)
    return counts


def usable_bn(bn: nn.Module) -> bool:
    """A BatchNorm whose eval-mode affine map can absorb a per-channel scale exactly."""
    return (isinstance(bn, _BatchNorm) and bn.affine and bn.track_running_stats
            and bn.running_mean is not None and not bn.training)


def probe(model: nn.Module, example_input: Tensor) -> Topology:
    """Run ``model`` once (eval mode) and record calls and layer -> BatchNorm edges."""
    topo = Topology()
    layer_out: dict[str, list] = {}
    bn_io: dict[str, list] = {}
    handles = []

    def record(name, module):
        def hook(mod, args, out):
            topo.calls[name] += 1
            if isinstance(mod, WEIGHTED_TYPES):
                t = first_tensor(out)
                layer_out.setdefault(name, []).append(None if t is None else t.grad_fn)
            elif isinstance(mod, _BatchNorm):
                i, o = first_tensor(args), first_tensor(out)
                bn_io.setdefault(name, []).append(
                    (None if i is None else i.grad_fn, None if o is None else o.grad_fn))
        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(record(name, module)))
    try:
        x = example_input.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()

    roots = [t.grad_fn for t in _all_tensors(out) if t.grad_fn is not None]
    counts = _edge_counts(roots)
    producer = {fns[0]: name for name, fns in layer_out.items() if len(fns) == 1 and fns[0] is not None}
    for bn_name, ios in bn_io.items():
        if len(ios) != 1 or not usable_bn(model.get_submodule(bn_name)):
            continue
        in_fn, out_fn = ios[0]
        layer = producer.get(in_fn)
        if layer is None or out_fn is None or counts[in_fn] != 1:
            continue
        if any(nxt is in_fn for nxt, _ in out_fn.next_functions):
            topo.bn_after[layer] = bn_name
    return topo
