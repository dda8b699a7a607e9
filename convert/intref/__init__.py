"""Pure-integer reference of QDQ ONNX graphs (see :mod:`.run` for the arithmetic and its limits)."""

from .requant import is_power_of_two
from .run import IntegerRun, Mismatch, QTensor, compare_runs, run_integer

__all__ = ["IntegerRun", "Mismatch", "QTensor", "compare_runs", "is_power_of_two", "run_integer"]
