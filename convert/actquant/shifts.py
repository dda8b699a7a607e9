"""The shifts of a ``--scale-format po2`` model.

A deployed layer computes ``acc = Σ x·w + b`` (int32) and requantizes it by the multiplier
``s_x · s_w,c / s_y = 2^(e_x + e_w,c - e_y)``; :func:`layer_shifts` writes that as the arithmetic
right shift ``n_c = e_y - e_x - e_w,c`` per output channel (negative: a left shift). The same holds
for the other requantizing points (add, pooling, concatenation), whose multipliers
``s_in / s_out`` are powers of two as well. The file-side check, every Q/DQ scale a power of two,
is the fixed-point target's rule (``convert/quantize/target_rules.py``).
"""

from __future__ import annotations

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
