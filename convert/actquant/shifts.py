"""The shifts of a ``--scale-format po2`` model and the power-of-two check of its QDQ file.

A deployed layer computes ``acc = Σ x·w + b`` (int32) and requantizes it by the multiplier
``s_x · s_w,c / s_y = 2^(e_x + e_w,c - e_y)``; :func:`layer_shifts` writes that as the arithmetic
right shift ``n_c = e_y - e_x - e_w,c`` per output channel (negative: a left shift). The same holds
for the other requantizing points (add, pooling, concatenation), whose multipliers
``s_in / s_out`` are powers of two as well.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import numpy_helper
from torch import fx

from ..errors import ParityError
from ..intref import is_power_of_two
from .layers import QLayer, deployed_parts
from .quantizer import ActQuantizer


def _exponent(value: float, what: str) -> int:
    e = is_power_of_two(value)
    if e is None:
        raise ParityError(f"{what} {value!r} is not a power of two")
    return e


def layer_shifts(qat_model: fx.GraphModule) -> dict[str, dict]:
    """Per conv/linear layer (by module name): the exponents of its input scale, per-channel
    weight scales and output scale, and the per-channel shift ``n``. Raises ParityError where a
    scale is not a power of two (a model not trained with ``po2``)."""
    out: dict[str, dict] = {}
    for node in qat_model.graph.nodes:
        if node.op != "call_module" or not isinstance(q := qat_model.get_submodule(node.target), QLayer):
            continue
        users = [qat_model.get_submodule(u.target) for u in node.users if u.op == "call_module"]
        out_q = next(u for u in users if isinstance(u, ActQuantizer))
        e_x = _exponent(q._input_quant.scale_value(), f"input scale of {q.name}")
        e_y = _exponent(out_q.scale_value(), f"output scale of {q.name}")
        e_w = [_exponent(float(s), f"weight scale of {q.name}") for s in deployed_parts(q).weight_scale]
        out[q.name] = {"input_exp": e_x, "output_exp": e_y, "weight_exp": e_w,
                       "shift": [e_y - e_x - e for e in e_w]}
    return out


def scale_initializers(model: onnx.ModelProto) -> dict[str, list[float]]:
    """Every initializer used as the scale of a QuantizeLinear/DequantizeLinear node (float32)."""
    inits = {t.name: t for t in model.graph.initializer}
    names = {n.input[1] for n in model.graph.node
             if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1}
    return {name: [float(v) for v in numpy_helper.to_array(inits[name]).reshape(-1)]
            for name in sorted(names) if name in inits}


def non_po2_scales(path_or_model: Path | onnx.ModelProto) -> list[str]:
    """Names of the Q/DQ scale initializers of a file that are not all exact powers of two
    (checked on the float32 bits), plus any Q/DQ scale that is not an initializer."""
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    scales = scale_initializers(model)
    bad = [name for name, values in scales.items() if any(is_power_of_two(v) is None for v in values)]
    computed = {n.input[1] for n in model.graph.node
                if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1} - set(scales)
    return bad + sorted(computed)
