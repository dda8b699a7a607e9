"""Power-of-two scales (``--scale-format po2``): every requantization is an arithmetic shift.

Two roundings, both in the log2 domain and both with a straight-through gradient in training:

* an activation scale is ``2 ** round(log2_scale)`` (:func:`round_ste`);
* a layer's per-channel weight step ``|t_c| / L`` (``t_c = g_c · f_c``: the scheme's gain times the
  BatchNorm factor, ``L = 2^(B-1) - 1``) becomes ``2 ** e_c`` with ``e_c = round(log2(|t_c| / L))``:
  the layer trains with ``t_c · r_c``, ``r_c = 2 ** (e_c - log2(|t_c| / L))`` in ``[2^-0.5, 2^0.5]``
  (:func:`po2_ratio`), and BatchNorm's factor ``f_c`` becomes ``f_c · r_c`` in the bias too.

The deployed multiplier ``s_x · s_w,c / s_y`` is then ``2^(e_x + e_c - e_y) = 2^-n_c``. Rounding is
half to even (``torch.round``) in training and in :func:`po2_exponents`, the numpy form the export
uses, so the eval-mode model and the file agree.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

MIN_LOG2 = -60.0  # a dead channel (t_c = 0) is given this exponent before rounding


def round_ste(x: Tensor) -> Tensor:
    """``round_half_even(x)`` forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def po2_ratio(t: Tensor, levels: int) -> Tensor:
    """``r`` with ``|t · r| / levels`` a power of two (per element), gradient straight through the
    rounding: ``t · r`` then has the gradient of ``t``."""
    lg = torch.log2((t.abs() / levels).clamp_min(2.0 ** MIN_LOG2))
    return torch.exp2(round_ste(lg) - lg)


def po2_exponents(t: np.ndarray, levels: int) -> np.ndarray:
    """``e_c = round_half_even(log2(|t_c| / levels))`` (int64), as :func:`po2_ratio` rounds."""
    lg = np.log2(np.maximum(np.abs(t) / levels, 2.0 ** MIN_LOG2))
    return np.round(lg).astype(np.int64)
