"""What every value of an ONNX model depends on, and the values of its constant subexpressions.

:class:`GraphIndex` visits every node once, subgraphs (``If``/``Loop``/``Scan`` bodies) included,
in an order where a producer comes before its consumers, and labels each value:

* ``constant``: computed from initializers and ``Constant`` nodes only (of any scope);
* ``activation``: depends on a graph input (or a subgraph's formal input);
* ``untraceable``: anything else (a random op, an op of another domain, the output of a control-flow
  node, a sparse initializer, an unknown name), whose value cannot be evaluated ahead of time.

:func:`evaluate` computes requested constant values with the ONNX reference evaluator. It
evaluates only the nodes upstream of what is requested, and a node shared by several requests
once: the requests are grouped by the nodes they share, one evaluation per group.
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops.op_dequantize_linear import DequantizeLinear_19

from .errors import UserInputError

CONST, ACT, OPAQUE = "constant", "activation", "untraceable"
DEFAULT_DOMAINS = ("", "ai.onnx")
CONTROL_FLOW = {"If", "Loop", "Scan", "SequenceMap"}
RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
              "Multinomial", "Bernoulli"}


@dataclass(frozen=True)
class Binding:
    """How a name is defined: its label, and the initializer or the node (global index) behind it."""

    status: str
    init: TensorProto | None = None
    node: int | None = None


UNKNOWN = Binding(OPAQUE)


class DequantizeLinear(DequantizeLinear_19):
    """DequantizeLinear of opsets 10 to 18 (int8, uint8, int32): the arithmetic of opset 19, the
    oldest the reference evaluator implements. Used only for models of an older opset."""

    op_domain = ""

    def _run(self, x, x_scale, x_zero_point=None, axis=1, block_size=0, output_dtype=None):
        return super()._run(x, x_scale, x_zero_point, axis=axis)


def label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def is_default(node: onnx.NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS


class GraphIndex:
    """Every node of a model, subgraphs included, with the scope its input names resolve in."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes: list[onnx.NodeProto] = []
        self.scopes: list[ChainMap] = []
        self.walk(model.graph, ChainMap())

    def walk(self, graph: onnx.GraphProto, parent: ChainMap) -> None:
        scope = parent.new_child()
        for vi in graph.input:
            scope[vi.name] = Binding(ACT)
        for t in graph.initializer:  # an initializer also listed as an input is a constant
            scope[t.name] = Binding(CONST, init=t)
        for s in graph.sparse_initializer:
            scope[s.values.name] = UNKNOWN
        for node in graph.node:
            idx = len(self.nodes)
            self.nodes.append(node)
            self.scopes.append(scope)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    self.walk(sub, scope)
            status = self._status(node, scope)
            for out in node.output:
                if out:
                    scope[out] = Binding(status, node=idx)

    @staticmethod
    def _status(node: onnx.NodeProto, scope: ChainMap) -> str:
        if node.op_type == "Constant" and is_default(node):
            return CONST
        found = {scope.get(i, UNKNOWN).status for i in node.input if i}
        if ACT in found:
            return ACT
        if OPAQUE in found or not found or not is_default(node) \
                or node.op_type in CONTROL_FLOW or node.op_type in RANDOM_OPS:
            return OPAQUE
        return CONST

    def binding(self, name: str, scope: ChainMap) -> Binding:
        return scope.get(name, UNKNOWN)

    def producer(self, b: Binding) -> onnx.NodeProto | None:
        return self.nodes[b.node] if b.node is not None else None


@dataclass
class Request:
    """A constant value to evaluate: ``name`` in ``scope``, or a synthetic node computing it."""

    name: str
    scope: ChainMap
    why: str                                   # who needs it, for error messages
    extra: onnx.NodeProto | None = None        # e.g. a DequantizeLinear for a QLinearConv weight
    result: tuple[list[int], float] | None = field(default=None, repr=False)


def summarize(arr: np.ndarray) -> tuple[list[int], float]:
    """``(shape, max |value|)``; NaN when a value is NaN or the tensor is empty."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"a weight of type {arr.dtype}")
    if arr.size == 0:
        return list(arr.shape), float("nan")
    if arr.dtype.kind != "f":  # abs of the most negative integer overflows in its own type
        arr = arr.astype(np.int64)
    return list(arr.shape), float(np.abs(arr).max())  # exact: |x| of a float is a float


def read_initializer(t: TensorProto) -> tuple[list[int], float]:
    return summarize(numpy_helper.to_array(t))


def evaluate(index: GraphIndex, requests: list[Request]) -> None:
    """Fill ``request.result`` for each request: one reference evaluation per group of requests
    that share nodes. Raises :class:`UserInputError` naming who needed a value that failed."""
    parent: list[int] = []
    owner: dict[int, int] = {}
    closures = [_closure(index, r, k, parent, owner) for k, r in enumerate(requests)]
    groups: dict[int, list[int]] = {}
    for k in range(len(requests)):
        groups.setdefault(_find(parent, k), []).append(k)
    for members in groups.values():
        _evaluate_group(index, [requests[k] for k in members], [closures[k] for k in members])


def _find(parent: list[int], k: int) -> int:
    while parent[k] != k:
        parent[k] = parent[parent[k]]
        k = parent[k]
    return k


def _closure(index: GraphIndex, req: Request, k: int, parent: list[int], owner: dict[int, int]):
    """Nodes and initializers ``req`` depends on that no earlier request has claimed; a node
    claimed earlier joins the two requests into one group."""
    parent.append(k)
    nodes: list[int] = []
    inits: dict[str, TensorProto] = {}
    start = req.extra.input if req.extra is not None else [req.name]
    stack = [(name, req.scope) for name in start if name]
    while stack:
        name, scope = stack.pop()
        b = index.binding(name, scope)
        if b.init is not None:
            inits[name] = b.init
        elif b.node is None or b.status != CONST:
            raise UserInputError(f"cannot evaluate {req.why}: {name!r} is not a constant")
        elif b.node in owner:
            a, c = _find(parent, k), _find(parent, owner[b.node])
            parent[max(a, c)] = min(a, c)
        else:
            owner[b.node] = k
            nodes.append(b.node)
            node = index.nodes[b.node]
            stack.extend((i, index.scopes[b.node]) for i in node.input if i)
    return nodes, inits


def _evaluate_group(index: GraphIndex, reqs: list[Request], closures) -> None:
    node_ids = sorted({n for nodes, _ in closures for n in nodes})
    inits = {name: t for _, i in closures for name, t in i.items()}
    nodes = [index.nodes[n] for n in node_ids] + [r.extra for r in reqs if r.extra is not None]
    outputs = [r.extra.output[0] if r.extra is not None else r.name for r in reqs]
    # initializers are fed as inputs: copying them into a new graph costs more than evaluating
    inputs = [helper.make_tensor_value_info(name, t.data_type, list(t.dims)) for name, t in inits.items()]
    graph = helper.make_graph(nodes, "weights", inputs, [helper.make_empty_tensor_value_info(o) for o in outputs])
    model = helper.make_model(graph, opset_imports=index.model.opset_import,
                              ir_version=index.model.ir_version)
    old = next((o.version < 19 for o in model.opset_import if o.domain in DEFAULT_DOMAINS), False)
    try:
        feeds = {name: numpy_helper.to_array(t) for name, t in inits.items()}
        values = ReferenceEvaluator(model, new_ops=[DequantizeLinear] if old else None).run(None, feeds)
        for r, v in zip(reqs, values):
            r.result = summarize(v)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserInputError(f"cannot evaluate {reqs[0].why}: {type(e).__name__}: {first}") from None
