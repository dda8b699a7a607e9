"""The pure-integer reference of a QDQ ONNX graph: :func:`run_integer` and :func:`compare_runs`.

Arithmetic: the float network input is quantized once, as ONNX ``QuantizeLinear`` does (float32
division, round half to even, saturation). From there every tensor is an integer array: int8/uint8
(or int4) activations times int8/int4 weights summed into int64 accumulators (int32 overflow is
reported, not hidden), plus the int32 bias, then requantized by an arithmetic shift that rounds half
to even and saturates (see :mod:`.execute`). Average pooling divides the integer window sum exactly:
``round_half_even(sum * 2^-n / count)`` in integer rationals.

Where a multiplier is not a power of two the reference falls back, visibly, to a float32 emulation
of onnxruntime's QLinear requantization and marks the tensor ``integer_only=False``.

Why 2^24 matters: float32 holds every integer up to 2^24 = 16 777 216 exactly, and not all beyond.
onnxruntime without graph optimizations runs DequantizeLinear -> float Conv -> QuantizeLinear, so its
partial sums are float32: exact while every partial sum stays within 2^24 (in units of the finest
step). With optimizations it fuses QLinearConv, whose int32 accumulator is exact, but it converts
that accumulator to float32 before multiplying by the requantization scale: exact while ``|acc|``
stays within 2^24. Each tensor records ``max_abs_acc`` (the final accumulator), ``max_abs_partial``
(``sum |x·w| + |b|``, a bound on any partial sum in any order) and flags either above 2^24: there a
float-based runtime may differ from the integer reference, and the integer reference is the one
that fixed-point hardware with a 32-bit accumulator computes.

Measured with onnxruntime 1.32 on an x86 CPU (tests/test_intref.py): with all optimizations it
fuses QDQ into QLinearConv, QGemm, QLinearMatMul, QLinearAdd, QLinearConcat, QLinearAveragePool and
QLinearGlobalAveragePool only for uint8 activations; with int8 activations (and int4 weights, and a
Conv followed by Clip) it keeps DequantizeLinear -> float op -> QuantizeLinear. Both levels, both
activation types, equal this reference bit for bit on power-of-two graphs (every op above, rounding
ties and saturation included); an accumulator of 31.5·2^20 − 1 (above 2^24) makes both one step off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserInputError
from .execute import FLOAT32_EXACT, INT32_RANGE, Requant, accumulator, quantize_input, requantize_accum, weight_scale
from .graph import QParams, Step, load_model, read_steps
from .ops import evaluate, move
from .requant import saturate


@dataclass
class QTensor:
    """One quantized tensor of the graph: its integers and how they were produced."""

    name: str
    op: str  # the core op: "QuantizeLinear" for the network input, "Conv", "Add", "Relu", ...
    node: str
    kind: str  # "input" | "requant" | "move" | "acc" (an int32 accumulator output, not requantized)
    values: np.ndarray  # int8/uint8 (int4 stored in int8), shape as in the graph; int32 for "acc"
    scale: float | list[float]  # a list: a per-channel accumulator scale (kind "acc")
    zero_point: int
    dtype: str
    input_scales: list[float]
    input_zero_points: list[int]
    weight_scales: list[float] | None
    shift: int | list | None
    integer_only: bool
    reason: str = ""
    max_abs_acc: int = 0
    max_abs_partial: int = 0

    @property
    def acc_over_2_24(self) -> bool:
        return self.max_abs_acc > FLOAT32_EXACT

    @property
    def partial_over_2_24(self) -> bool:
        return self.max_abs_partial > FLOAT32_EXACT

    @property
    def int32_overflow(self) -> bool:
        return not INT32_RANGE[0] <= self.max_abs_acc <= INT32_RANGE[1]


@dataclass
class IntegerRun:
    tensors: dict[str, QTensor] = field(default_factory=dict)  # graph order
    input_name: str = ""  # the quantized network input
    seconds: float = 0.0

    @property
    def integer_only(self) -> bool:
        return all(t.integer_only for t in self.tensors.values())

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: t.values for name, t in self.tensors.items()}

    def over_2_24(self) -> list[str]:
        return [n for n, t in self.tensors.items() if t.acc_over_2_24 or t.partial_over_2_24]


@dataclass
class Mismatch:
    """The first tensor, in graph order, where two runs differ."""

    name: str
    op: str
    node: str
    count: int  # differing elements (all of them when the shapes differ)
    total: int
    max_abs_diff: int | None  # None when the shapes differ

    def __str__(self) -> str:
        diff = "shapes differ" if self.max_abs_diff is None else f"max |difference| {self.max_abs_diff}"
        return f"{self.op} '{self.node}' (tensor '{self.name}'): {self.count} of {self.total} elements differ, {diff}"


def _inputs(steps: list[Step], x_float) -> dict[str, np.ndarray]:
    names = [s.source for s in steps if s.kind == "input"]
    if not names:
        raise UserInputError("the graph has no QuantizeLinear of a float input: not a QDQ integer graph")
    if isinstance(x_float, dict):
        missing = [n for n in names if n not in x_float]
        if missing:
            raise UserInputError(f"no value given for graph input(s) {', '.join(missing)}")
        return {n: np.asarray(x_float[n]) for n in names}
    if len(set(names)) > 1:
        raise UserInputError(f"the graph quantizes several inputs ({', '.join(names)}): pass a dict")
    return {names[0]: np.asarray(x_float)}


def _record(step: Step, values: np.ndarray, req: Requant | None, params: QParams) -> QTensor:
    w = weight_scale(step)
    acts = [o for o in step.operands if o.params.axis is None and o.const is None]
    scale = float(params.scale) if params.axis is None else [float(v) for v in params.scale]
    return QTensor(step.out, step.op, step.node, step.kind, values, scale,
                   int(np.asarray(params.zero_point).reshape(-1)[0]), params.qtype.name,
                   [float(o.params.scale) for o in acts], [int(o.params.zero_point) for o in acts],
                   None if w is None else [float(v) for v in np.asarray(w).reshape(-1)],
                   req.shift if req else None, req.integer_only if req else True, req.reason if req else "",
                   req.max_abs_acc if req else 0, req.max_abs_partial if req else 0)


def _execute(step: Step, env: dict, inputs: dict) -> tuple[np.ndarray, Requant | None, QParams]:
    values, req, params = _compute(step, env, inputs)
    if step.qclamp is not None:
        values = saturate(values, *step.qclamp)
    return values, req, params


def _compute(step: Step, env: dict, inputs: dict) -> tuple[np.ndarray, Requant | None, QParams]:
    p = step.out_params
    if step.kind == "input":
        return quantize_input(inputs[step.source], p, step.clamp), None, p
    if step.kind == "move":
        return move(step, env), None, p
    if step.kind == "acc":
        values, params, req = accumulator(evaluate(step, env))
        return values, req, params
    return *requantize_accum(evaluate(step, env), p, step.clamp), p


@dataclass
class IntegerGraph:
    """A QDQ graph read once into its integer steps (:func:`read_graph`): :func:`run_integer` on it
    skips reading the file again and keeps what the kernels derive from each weight between calls."""

    steps: list[Step]


def read_graph(onnx_path_or_model) -> IntegerGraph:
    """Read a QDQ file (path or ``onnx.ModelProto``) for several :func:`run_integer` calls."""
    return IntegerGraph(read_steps(load_model(onnx_path_or_model)))


def run_integer(onnx_path_or_model, x_float) -> IntegerRun:
    """Execute the QDQ graph in integers on ``x_float`` (an array, or a dict for several inputs).
    ``onnx_path_or_model``: a path, an ``onnx.ModelProto`` or an :class:`IntegerGraph`."""
    if isinstance(onnx_path_or_model, IntegerGraph):
        steps = onnx_path_or_model.steps
    else:
        steps = read_steps(load_model(onnx_path_or_model))
    inputs = _inputs(steps, x_float)
    start = time.perf_counter()
    run = IntegerRun()
    env: dict[str, np.ndarray] = {}
    for step in steps:
        try:
            values, req, params = _execute(step, env, inputs)
        except ValueError as e:  # shapes that do not fit the op's attributes
            raise UserInputError(f"{step.op} node '{step.node}': {e}") from None
        except UserInputError as e:
            if f"'{step.node}'" in str(e):
                raise
            raise UserInputError(f"{step.op} node '{step.node}': {e}") from None
        wide = req is not None and not INT32_RANGE[0] <= req.max_abs_acc <= INT32_RANGE[1]
        values = values.astype(np.int64 if step.kind == "acc" and wide else params.qtype.storage)
        env[step.out] = values
        run.tensors[step.out] = _record(step, values, req, params)
        if step.kind == "input" and not run.input_name:
            run.input_name = step.out
    run.seconds = time.perf_counter() - start
    return run


def _broadcast_scale(t: QTensor) -> np.ndarray:
    scale = np.asarray(t.scale, dtype=np.float64)
    if scale.ndim == 0:
        return scale
    axis = 1 if t.op == "Conv" else t.values.ndim - 1  # the output-channel axis
    return scale.reshape([-1 if i == axis else 1 for i in range(t.values.ndim)])


def compare_runs(a: IntegerRun, b: IntegerRun | dict[str, np.ndarray]) -> Mismatch | None:
    """The first tensor of ``a`` (graph order) that differs in ``b``, or ``None`` when all agree.

    Tensors of ``a`` that ``b`` does not hold are skipped; no tensor in common is an error. A float
    array in ``b`` (a runtime's float output of an accumulator tensor) is compared in units of the
    tensor's scale: ``rint(value / scale)``.
    """
    other = b.arrays() if isinstance(b, IntegerRun) else b
    common = [n for n in a.tensors if n in other]
    if not common:
        raise UserInputError("the two runs have no quantized tensor name in common")
    for name in common:
        t, ref = a.tensors[name], np.asarray(other[name])
        if np.issubdtype(ref.dtype, np.floating):
            ref = np.rint(ref.astype(np.float64) / _broadcast_scale(t))
        if t.values.shape != ref.shape:
            return Mismatch(name, t.op, t.node, t.values.size, t.values.size, None)
        diff = t.values.astype(np.int64) - ref.astype(np.int64)
        count = int(np.count_nonzero(diff))
        if count:
            return Mismatch(name, t.op, t.node, count, diff.size, int(np.abs(diff).max()))
    return None
