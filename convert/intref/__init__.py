"""Pure-integer reference of QDQ ONNX graphs (see :mod:`.run` for the arithmetic and its limits)."""

from .requant import is_power_of_two
from .run import IntegerGraph, IntegerRun, Mismatch, QTensor, compare_runs, read_graph, run_integer

__all__ = ["IntegerGraph", "IntegerRun", "Mismatch", "QTensor", "compare_runs", "is_power_of_two", "read_graph",
           "run_integer"]
