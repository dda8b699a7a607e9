"""Capture a reparametrized model with torch.fx and insert activation quantizers.

One description of the quantized graph, the list of :class:`QuantPoint`, is produced here and used
both by the fake-quant model and by the exporter. A point sits on every tensor the deployed integer
graph holds in integers: the network input; the output of every conv(+BN)(+ReLU/ReLU6) and linear
(one :class:`~.layers.QLayer`) except, with ``residual_conv='float'`` (OpenVINO's placement), a
conv read only by a residual add that is fused into it; residual adds (after a following ReLU
when there is one); average pooling; concatenation. Max pooling, flatten, dropout and identity pass their input's
integers on
(no new point); so does stochastic depth (EfficientNet), the identity in eval.

Operations without an integer form (:data:`FLOAT_OPS`: hardswish, hardsigmoid, SiLU, sigmoid, GELU,
tanh, and the multiply of two tensors in squeeze-excite blocks) are refused, naming the op, unless
the config asks for mixed precision: then each stays in float between the dequantized integers of
its inputs and a new point on its output (kind ``float``, its op recorded), the island the export
writes as DequantizeLinear -> op -> QuantizeLinear. Any other operation is refused.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import StochasticDepth

from ..errors import UserInputError
from .graph_ops import (
    ADD,
    AVGPOOL,
    AVGPOOL_FN,
    BN_TYPES,
    CAT,
    FLOAT_OPS,
    LAYER_TYPES,
    float_op,
    is_passthrough,
    module_of,
    op_name,
    relu_kind,
    sole_user,
)
from .layers import QLayer
from .quantizer import ActQuantConfig, ActQuantizer


@dataclass(frozen=True)
class QuantPoint:
    """A tensor held in integers: ``name`` (also the quantizer's key and the ONNX node tag), the
    fx node it follows, the kind of producer, signedness and bits."""

    name: str
    node: str
    kind: str      # input | layer | add | pool | cat | float
    signed: bool
    bits: int
    op: str | None = None   # kind float: the operation kept in float (a FLOAT_OPS name)

    def to_dict(self) -> dict:
        return asdict(self)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # a leaf StochasticDepth keeps following the module's mode (traced through, it would not)
        return isinstance(m, LAYER_TYPES + (StochasticDepth,)) or super().is_leaf_module(m, qualname)


class _Builder:
    """Walks the traced graph once and writes the quantized graph."""

    def __init__(self, gm: fx.GraphModule, config: ActQuantConfig) -> None:
        self.gm, self.config = gm, config
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.nonneg: dict[fx.Node, bool] = {}     # per new node: known non-negative
        self.quant_of: dict[fx.Node, ActQuantizer] = {}  # per new node: quantizer of its integers
        self.modules: dict[str, nn.Module] = {}
        self.points: list[QuantPoint] = []
        self.absorbed: set[fx.Node] = set()
        self.float_layers = self._fused_add_convs() if config.residual_conv == "float" else set()
        self.float_outputs: set[fx.Node] = set()   # new nodes a residual add reads in float

    def _fused_add_convs(self) -> set[str]:
        """The convs whose output (after its BatchNorm) only a residual add reads and that the add
        is fused into (OpenVINO, quantize/placement.py): per add, the later such conv in the graph."""
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        chosen = set()
        for n in self.gm.graph.nodes:
            if not _is_add(n) or len(n.all_input_nodes) != 2:
                continue
            convs = [c for c in (self._conv_ending_at(a) for a in n.all_input_nodes if sole_user(a) is n)
                     if c is not None]
            if convs:
                chosen.add(max(convs, key=order.__getitem__).name)
        return chosen

    def _conv_ending_at(self, a: fx.Node) -> fx.Node | None:
        """The conv node whose output ``a`` is, directly or through its BatchNorm (no activation)."""
        if module_of(self.gm, a, BN_TYPES) is not None:
            a = a.args[0] if isinstance(a.args[0], fx.Node) and sole_user(a.args[0]) is a else None
        layer = module_of(self.gm, a, LAYER_TYPES) if a is not None else None
        return a if isinstance(layer, nn.modules.conv._ConvNd) else None

    def _call(self, target: str, module: nn.Module, args) -> fx.Node:
        self.modules[target] = module
        return self.graph.call_module(target, args)

    def quantize(self, new: fx.Node, old: fx.Node, kind: str, max_scale: float | None = None,
                 op: str | None = None, tflite: tuple = (), reads: tuple = ()) -> fx.Node:
        """``tflite``: under ``--rounding tflite``, the source of the point's TFLite arithmetic
        (:meth:`ActQuantizer.set_tflite_source`), ``reads`` the graph nodes it is computed from."""
        name = "input" if kind == "input" else old.name
        signed = not self.nonneg.get(new, False)
        bits = self.config.bits
        q = ActQuantizer(bits, signed, self.config.range == "learned",
                         max_scale=None if max_scale is None else max_scale / (2 ** bits - 1), po2=self.config.po2)
        tfl = self.config.rounding == "tflite"
        if tfl:
            q.rounding = "tflite"
            if tflite:
                q.set_tflite_source(*tflite)
        out = self._call(f"act_quant.{name}", q, (new, *reads) if tfl else (new,))
        self.points.append(QuantPoint(name, old.name, kind, signed, bits, op))
        self.nonneg[out] = not signed
        self.quant_of[out] = q
        return out

    def input_quant(self, new: fx.Node, who: str) -> ActQuantizer:
        q = self.quant_of.get(new)
        if q is None:
            raise UserInputError(f"{who} reads a tensor that is not quantized; cannot quantize this graph")
        return q

    def run(self) -> None:
        for n in self.gm.graph.nodes:
            if n in self.absorbed:
                continue
            if n.op == "placeholder":
                self.env[n] = self.quantize(self.graph.placeholder(n.name), n, "input")
            elif n.op == "output":
                self.graph.output(fx.node.map_arg(n.args[0], lambda a: self.env[a]))
            elif module_of(self.gm, n, LAYER_TYPES) is not None:
                self._layer(n)
            else:
                self._other(n)

    def _layer(self, n: fx.Node) -> None:
        bn, act, last = None, None, n
        user = sole_user(last)
        if user is not None and module_of(self.gm, user, BN_TYPES) is not None:
            bn, last = self.gm.get_submodule(user.target), user
            self.absorbed.add(user)
        user = sole_user(last)
        if user is not None and relu_kind(self.gm, user):
            act, last = relu_kind(self.gm, user), user
            self.absorbed.add(user)
        x = self.env[n.args[0]]
        q = QLayer(self.gm.get_submodule(n.target), bn, act, n.target, po2=self.config.po2)
        q.set_input_quantizer(self.input_quant(x, f"layer {n.target}"))
        new = self._call(f"qlayers.{n.name}", q, (x,))
        self.nonneg[new] = act is not None
        if n.name in self.float_layers:  # a residual add reads it in float (fused into this conv)
            self.env[last] = new
            self.float_outputs.add(new)
            return
        self.env[last] = self.quantize(new, n, "layer", 6.0 if act == "relu6" else None, tflite=("layer", q))

    def _other(self, n: fx.Node) -> None:
        args = fx.node.map_arg(n.args, lambda a: self.env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self.env[a])
        new = self.graph.node_copy(n, lambda a: self.env[a])
        if n.op == "call_module":
            self.modules[n.target] = self.gm.get_submodule(n.target)
        ins = [a for a in list(args) + list(kwargs.values()) if isinstance(a, fx.Node)]
        if n.op == "call_method" and n.target == "size":
            self.env[n] = new
            return
        if is_passthrough(self.gm, n):
            self.nonneg[new] = self.nonneg.get(ins[0], False)
            self.quant_of[new] = self.input_quant(ins[0], f"{op_name(self.gm, n)} node {n.name!r}")
            self.env[n] = new
        elif _is_add(n):
            self._add(n, new, ins)
        elif n.op == "call_function" and n.target in CAT:
            if self.config.rounding == "tflite":
                raise UserInputError(f"--rounding tflite: concatenation node {n.name!r} has no TFLite arithmetic "
                                     "here (TFLite's CONCATENATION needs one scale on every input)")
            self.nonneg[new] = all(self.nonneg.get(a, False) for a in args[0])
            self.env[n] = self.quantize(new, n, "cat")
        elif module_of(self.gm, n, AVGPOOL) is not None or (n.op == "call_function" and n.target in AVGPOOL_FN):
            self.nonneg[new] = self.nonneg.get(ins[0], False)
            tfl = ()
            if self.config.rounding == "tflite":
                _require_global_pool(self.gm, n)
                tfl = ("pool", self.input_quant(ins[0], f"pooling node {n.name!r}"))
            self.env[n] = self.quantize(new, n, "pool", tflite=tfl, reads=(ins[0],))
        elif float_op(self.gm, n) is not None:
            self._float(n, new, ins, float_op(self.gm, n))
        else:
            raise UserInputError(
                f"operation {op_name(self.gm, n)} (node {n.name!r}) has no integer form; "
                "activation quantization supports conv/linear(+BN)(+ReLU/ReLU6), add, cat, "
                "max/average pooling, flatten and dropout (and, with --mixed-precision, "
                f"{', '.join(FLOAT_OPS)} in float)")
        for a in ins:
            if a not in self.float_outputs:
                self.input_quant(a, f"{op_name(self.gm, n)} node {n.name!r}")

    def _float(self, n: fx.Node, new: fx.Node, ins: list[fx.Node], op: str) -> None:
        """A mixed-precision island: ``op`` in float on dequantized inputs, its output quantized."""
        if not self.config.mixed_precision:
            raise UserInputError(
                f"operation {op_name(self.gm, n)} (node {n.name!r}) has no integer form; "
                "--mixed-precision keeps it in float between DequantizeLinear and QuantizeLinear")
        if op == "mul" and len(ins) != 2:
            raise UserInputError(f"multiply node {n.name!r} with a constant operand has no QDQ form here")
        if op == "gelu" and n.kwargs.get("approximate", getattr(self._mod(n), "approximate", "none")) != "none":
            raise UserInputError(f"GELU node {n.name!r} with approximate='tanh' is not supported; use the exact GELU")
        mod = self._mod(n)
        if getattr(mod, "inplace", False):  # it would overwrite its input, a quantizer's output
            mod.inplace = False
        nonneg = FLOAT_OPS[op]
        self.nonneg[new] = all(self.nonneg.get(a, False) for a in ins) if nonneg is None else nonneg
        self.env[n] = self.quantize(new, n, "float", op=op)

    def _mod(self, n: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(n.target) if n.op == "call_module" else None

    def _add(self, n: fx.Node, new: fx.Node, ins: list[fx.Node]) -> None:
        if len(ins) != 2:
            raise UserInputError(f"add node {n.name!r} with a constant operand has no integer form here")
        user = sole_user(n)
        kind = relu_kind(self.gm, user) if user is not None else None
        if kind == "relu6":
            raise UserInputError(f"ReLU6 after add node {n.name!r} is not supported")
        tfl = ()
        if self.config.rounding == "tflite":
            tfl = ("add", *(self.input_quant(a, f"add node {n.name!r}") for a in ins))
        if kind == "relu":
            self.absorbed.add(user)
            new = self.graph.call_function(F.relu, (new,))
            self.nonneg[new] = True
            self.env[user] = self.quantize(new, n, "add", tflite=tfl, reads=tuple(ins))
        else:
            self.nonneg[new] = all(self.nonneg.get(a, False) for a in ins)
            self.env[n] = self.quantize(new, n, "add", tflite=tfl, reads=tuple(ins))


def _require_global_pool(gm: fx.GraphModule, n: fx.Node) -> None:
    """``--rounding tflite`` computes a pool as TFLite's MEAN over H and W: a global pool only."""
    mod = gm.get_submodule(n.target) if n.op == "call_module" else None
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        size = mod.output_size
    elif n.op == "call_function" and n.target is F.adaptive_avg_pool2d:
        size = n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")
    else:
        size = None
    if size not in (1, (1, 1), [1, 1]):
        raise UserInputError(f"--rounding tflite: pooling node {n.name!r} is not a global average pool; only "
                             "that one (TFLite's MEAN) has TFLite arithmetic here")


def _is_add(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in ADD or (n.op == "call_method" and n.target in ("add", "add_"))


def prepare_qat(model: nn.Module, config: ActQuantConfig) -> fx.GraphModule:
    """A fake-quant copy of ``model`` (already reparametrized with ``weight_bits``): an fx
    GraphModule with one :class:`ActQuantizer` per point under ``act_quant.<point>`` and one
    :class:`QLayer` per conv/linear under ``qlayers.<node>``; :func:`act_points` lists the points
    (kept in ``gm.meta``, which survives ``copy.deepcopy``).
    The source model is not modified. Scales start at 1: call :func:`calibrate` next."""
    work = copy.deepcopy(model)
    try:
        traced = fx.GraphModule(work, _Tracer().trace(work))
    except Exception as err:  # data-dependent control flow and the like
        raise UserInputError(f"cannot capture the model graph with torch.fx: {err}".splitlines()[0]) from err
    b = _Builder(traced, config)
    b.run()
    gm = fx.GraphModule(b.modules, b.graph, class_name="ActQuantModel")
    gm.meta["act_points"] = tuple(b.points)
    gm.meta["act_config"] = config
    gm.train(model.training)
    return gm


def act_points(qat_model: fx.GraphModule) -> tuple[QuantPoint, ...]:
    """The quantization points of a :func:`prepare_qat` model, in graph order."""
    return qat_model.meta["act_points"]


def act_config(qat_model: fx.GraphModule) -> ActQuantConfig:
    return qat_model.meta["act_config"]


def quantizers(qat_model: nn.Module) -> dict[str, ActQuantizer]:
    """Point name -> its quantizer, in graph order."""
    return {p.name: qat_model.get_submodule(f"act_quant.{p.name}") for p in act_points(qat_model)}


def qlayers(qat_model: nn.Module) -> list[QLayer]:
    return [m for m in qat_model.modules() if isinstance(m, QLayer)]


@torch.no_grad()
def calibrate(qat_model: nn.Module, batches) -> dict[str, float]:
    """Set every activation scale from a few (training) batches: the network runs in training
    mode with its quantizers passing activations through; BatchNorm running statistics are left
    as they were. Returns point -> scale."""
    qs = quantizers(qat_model)
    bns = [m for m in qat_model.modules() if isinstance(m, BN_TYPES)]
    saved = [copy.deepcopy(bn.state_dict()) for bn in bns]
    was_training = qat_model.training
    qat_model.train()
    for q in qs.values():
        q.calibrating = True
    try:
        for x in batches:
            qat_model(x)
    finally:
        for q in qs.values():
            q.finish_calibration()
        for bn, state in zip(bns, saved):
            bn.load_state_dict(state)
        qat_model.train(was_training)
    return {name: q.scale_value() for name, q in qs.items()}


def freeze_bn(qat_model: nn.Module) -> int:
    """From now on every fused BatchNorm uses (and keeps) its running statistics, in training
    too, so training and the deployed layer agree. Returns how many were frozen."""
    n = 0
    for q in qlayers(qat_model):
        if q.bn is not None:
            q.bn_frozen.fill_(True)
            n += 1
    return n


@torch.no_grad()
def activation_diagnostics(qat_model: nn.Module, x: torch.Tensor) -> dict[str, dict]:
    """Per point: its scale, the fraction of elements clipped and the SQNR (dB) of its quantized
    tensor, on one batch ``x`` run in eval mode (the deployed network)."""
    out: dict[str, dict] = {}
    handles = []
    for name, q in quantizers(qat_model).items():
        def hook(mod, args, name=name):
            out[name] = mod.diagnose(args[0])
        handles.append(q.register_forward_pre_hook(hook))
    was_training = qat_model.training
    qat_model.eval()
    try:
        qat_model(x)
    finally:
        qat_model.train(was_training)
        for h in handles:
            h.remove()
    return out
