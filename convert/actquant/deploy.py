"""The deployed file of a QAT model: what ``wnconvert export --precision int8|int4`` writes for an
``--act-bits`` run and ``wnconvert.export`` writes for a network prepared in a user's own script.

The precision follows the trained weight grid (int8 holds 5..8-bit weights, int4 the 2..4-bit
ones); with power-of-two scales every scale of the file is checked to be one and the per-layer
shifts are returned; ``check`` (a target's rules) sees the temporary file. Nothing is put in place
unless every check passed."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx
from torch import fx

from ..artifacts import atomic_path
from ..errors import ParityError, UserInputError
from ..names import DEPLOYED_WEIGHT_BITS as WEIGHT_BITS
from ..quantize.target_rules import fixed_point_violations
from .export_qdq import ExportInfo, export_qdq
from .prepare import act_config, qlayers
from .shifts import layer_shifts


def deployed_precision(qat_model: fx.GraphModule) -> str:
    """int8 or int4: the storage of the model's widest weight grid."""
    layers = qlayers(qat_model)
    if not layers:
        raise UserInputError("the model has no quantized conv/linear layer (prepare it with act_bits)")
    bits = max(int(q.weight_bits) for q in layers)
    return next(p for p, r in WEIGHT_BITS.items() if bits in r)


def write_deployed(qat_model: fx.GraphModule, dst: Path, *, example_shape: tuple[int, ...],
                   container: str = "int4",
                   check: Callable[[Path], None] | None = None) -> tuple[ExportInfo, dict | None]:
    """Write ``qat_model`` as QDQ ONNX to ``dst`` (atomically): its export info and, for
    power-of-two scales, the per-layer shifts (None otherwise)."""
    dst = Path(dst)
    po2 = act_config(qat_model).po2
    shifts = layer_shifts(qat_model) if po2 else None  # raises before anything is written
    with atomic_path(dst) as tmp:  # a po2 file is in place only once its scales are checked
        info = export_qdq(qat_model, tmp, example_shape=example_shape,  # opset 17, 21 with INT4
                          container=container)
        bad = fixed_point_violations(onnx.load(str(tmp))) if po2 else []
        if bad:
            raise ParityError(f"{dst.name} of a po2 run: {bad[0]}")
        if check is not None:
            check(tmp)
    info.path = dst
    return info, shifts
