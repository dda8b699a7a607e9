"""The bit-exact contract of a power-of-two QDQ file: four computations, one set of integers.

At every quantization point (the tensor ``<point>_q`` of the node ``Q_<point>``, in graph order)
and at the logits, four sources must hold the same values on every element, free-running from the
same float images:

* ``pytorch``: the eval-mode fake-quant model (:func:`~.prepare.prepare_qat`), its integers
  ``round_half_even(x / s)`` read at each quantizer;
* ``intref``: the pure-integer reference :func:`~wnconvert.convert.intref.run_integer` of the file;
* ``ort_off`` / ``ort_on``: onnxruntime with graph optimizations off (float kernels between Q and
  DQ) and on (fused integer kernels), read through :class:`~.ort_points.OrtPoints`.

Equality, not tolerance. When every scale is a power of two (every requantization a shift), the
float runtimes compute exactly what the integers do as long as their float32 values stay integers
in units of the finest step, that is within 2^24 = 16 777 216. Each layer reports the integer
reference's largest accumulator ``|acc|`` and the bound ``sum |x·w| + |b|`` on any partial sum, and
flags either beyond 2^24. A difference at a flagged layer is labelled as such: there a float32
runtime (PyTorch's fake quant, onnxruntime's unfused graph, or its fused kernels, which convert the
int32 accumulator to float32 before the shift) may round the accumulator, and the integer
reference is what fixed-point hardware with a 32-bit accumulator computes. It is still a failure:
the file then has no bit-exact float simulation.

A layer the integer reference cannot run with integers alone (a multiplier that is not a power of
two) fails the contract too, naming the layer and its multiplier.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from torch import fx

from ..errors import ParityError, UserInputError
from ..intref import read_graph, run_integer
from ..intref.execute import FLOAT32_EXACT
from ..reading import load_onnx
from .logits import find_classifier
from .ort_points import OrtPoints
from .prepare import act_points, quantizers
from .structure import unexpected_nodes
from .tflite_points import onnx_rounding

CONTRACT = "bit-exact"
SOURCES = ("pytorch", "intref", "ort_off", "ort_on")
PAIRS = [f"{a}/{b}" for a, b in combinations(SOURCES, 2)]
LOGITS = "logits"
BATCH = 8


@dataclass
class LayerCheck:
    """One compared tensor: counts over all images, and the integer reference's record of it."""

    tensor: str                 # the ONNX tensor, ``<point>_q`` (or ``logits``)
    point: str
    op: str = ""
    node: str = ""
    elements: int = 0
    differ: int = 0             # elements on which the four sources do not all agree
    mismatches: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PAIRS, 0))
    max_abs_acc: int = 0
    max_abs_partial: int = 0
    integer_only: bool = True
    reason: str = ""
    sources: list[str] = field(default_factory=list)  # sources compared
    missing: list[str] = field(default_factory=list)  # sources without this tensor

    @property
    def over_2_24(self) -> bool:
        return self.max_abs_acc > FLOAT32_EXACT or self.max_abs_partial > FLOAT32_EXACT

    def to_dict(self) -> dict:
        return asdict(self) | {"acc_over_2_24": self.max_abs_acc > FLOAT32_EXACT,
                               "partial_over_2_24": self.max_abs_partial > FLOAT32_EXACT}

    def describe(self) -> str:
        pairs = ", ".join(f"{p} {n}" for p, n in self.mismatches.items() if n)
        text = (f"{self.op} '{self.node}' (tensor '{self.tensor}'): {self.differ} of {self.elements} "
                f"elements differ ({pairs})")
        if self.max_abs_acc > FLOAT32_EXACT:
            text += f"; its accumulator reaches {self.max_abs_acc} > 2^24"
        elif self.over_2_24:
            text += f"; its partial sums may reach {self.max_abs_partial} > 2^24 (bound sum |x*w| + |b|)"
        if self.over_2_24:
            text += (", where float32 runtimes are inexact (the integer reference is what a 32-bit "
                     "integer accumulator computes)")
        return text


@dataclass
class BitExactReport:
    images: int
    layers: list[LayerCheck]    # graph order, then the logits
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def first_difference(self) -> LayerCheck | None:
        return next((c for c in self.layers if c.differ), None)

    def to_dict(self) -> dict:
        first = self.first_difference
        return {"contract": CONTRACT, "passed": self.passed, "failures": self.failures, "images": self.images,
                "sources": list(SOURCES), "layers": [c.to_dict() for c in self.layers],
                "first_difference": None if first is None else {
                    "tensor": first.tensor, "op": first.op, "node": first.node, "differ": first.differ,
                    "elements": first.elements, "over_2_24": first.over_2_24}}


@torch.no_grad()
def _pytorch(qat_model: fx.GraphModule, x: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The fake-quant model's integers at every point (read by a pre-hook) and its logits."""
    seen: dict[str, np.ndarray] = {}
    handles = []
    for name, q in quantizers(qat_model).items():
        def hook(mod, args, name=name):
            seen[name] = mod.integers(args[0])[0].cpu().numpy().astype(np.int64)
        handles.append(q.register_forward_pre_hook(hook))
    try:
        logits = qat_model(x).float().cpu().numpy()
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def _intref(model, points: list[str], x: np.ndarray, checks: dict[str, LayerCheck]):
    """The integer reference's integers at every point (zero point removed), its logits (the last
    point's integers times its scale, in float32, as DequantizeLinear), and each layer's record."""
    run = run_integer(model, x)
    ints = {}
    for p in points:
        t = run.tensors.get(f"{p}_q")
        if t is None:
            continue
        ints[p] = t.values.astype(np.int64) - t.zero_point
        c = checks[p]
        c.op, c.node = t.op, t.node
        c.max_abs_acc = max(c.max_abs_acc, t.max_abs_acc)
        c.max_abs_partial = max(c.max_abs_partial, t.max_abs_partial)
        if not t.integer_only:
            c.integer_only, c.reason = False, t.reason
    last = run.tensors.get(f"{points[-1]}_q")
    logits = None if last is None else ints[points[-1]].astype(np.float32) * np.float32(last.scale)
    return ints, logits


def _compare(check: LayerCheck, values: dict[str, np.ndarray | None]) -> None:
    """Add one batch's comparison of ``values`` (source -> array, None when missing) to ``check``."""
    present = {s: v for s, v in values.items() if v is not None}
    check.missing = sorted(set(check.missing) | {s for s, v in values.items() if v is None})
    check.sources = [s for s in SOURCES if s in set(check.sources) | set(present)]
    if not present:
        return
    shapes = {v.shape for v in present.values()}
    ref = next(iter(present.values()))
    check.elements += ref.size
    if len(shapes) > 1:  # a shape mismatch: every element differs
        check.differ += ref.size
        return
    differ = np.zeros(ref.shape, dtype=bool)
    for a, b in combinations(SOURCES, 2):
        if a in present and b in present:
            ne = present[a] != present[b]
            check.mismatches[f"{a}/{b}"] += int(np.count_nonzero(ne))
            differ |= ne
    check.differ += int(np.count_nonzero(differ))


def _batch(qat_model, model, sessions, points, xb, checks) -> None:
    pt_ints, pt_logits = _pytorch(qat_model, xb)
    ir_ints, ir_logits = _intref(model, points, xb.numpy(), checks)
    runs = {level: s.run(xb.numpy()) for level, s in sessions.items()}
    for p in points:
        _compare(checks[p], {"pytorch": pt_ints.get(p), "intref": ir_ints.get(p),
                             **{level: r[0].get(p) for level, r in runs.items()}})
    _compare(checks[LOGITS], {"pytorch": pt_logits, "intref": ir_logits,
                              **{level: r[1] for level, r in runs.items()}})


def _failures(checks: list[LayerCheck]) -> list[str]:
    out = [f"{c.tensor}: not in {', '.join(c.missing)}" for c in checks if c.missing]
    first = next((c for c in checks if c.differ), None)
    if first is not None:
        out.insert(0, f"first difference at {first.describe()}")
    out += [f"{c.op} '{c.node}' (tensor '{c.tensor}') is not integer-only: {c.reason}"
            for c in checks if not c.integer_only]
    return out


@onnx_rounding
@torch.no_grad()
def check_bit_exact(qat_model: fx.GraphModule, onnx_path: Path, x: torch.Tensor,
                    batch_size: int = BATCH) -> BitExactReport:
    """Compare the eval-mode ``qat_model``, the integer reference of ``onnx_path`` and onnxruntime
    (optimizations off and on) on the float NCHW images ``x``, in batches of ``batch_size``."""
    was_training = qat_model.training
    qat_model.eval()
    try:
        points = [p.name for p in act_points(qat_model)]
        model = load_onnx(onnx_path, error=ParityError)  # under the contract: unreadable is a failure (3)
        cls = find_classifier(qat_model)
        structural = unexpected_nodes(model, cls.out_point if cls is not None else points[-1])
        if structural:  # an operation the export never writes: not the trained network
            return BitExactReport(len(x), [], structural)
        sessions = {"ort_off": OrtPoints(Path(onnx_path), points, False, model=model),
                    "ort_on": OrtPoints(Path(onnx_path), points, True, model=model)}
        checks = {p: LayerCheck(f"{p}_q", p) for p in points}
        out = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
        checks[LOGITS] = LayerCheck(LOGITS, LOGITS, out.op_type, out.name or LOGITS)
        if len(x) == 0:
            raise UserInputError("the bit-exact check needs at least one image")
        x = x.float()
        graph = read_graph(model)   # read once for every batch
        try:
            for i in range(0, len(x), batch_size):
                _batch(qat_model, graph, sessions, points, x[i:i + batch_size], checks)
        except UserInputError as e:  # the integer reference refuses the file: it is not the trained network
            return BitExactReport(len(x), list(checks.values()), [f"the integer reference cannot run the file: {e}"])
        layers = list(checks.values())
        return BitExactReport(len(x), layers, _failures(layers))
    finally:
        qat_model.train(was_training)
