"""Integer kernels on int64 numpy arrays (NCHW): convolution, matrix product, max and sum pooling.

Inputs are already offset by their zero points (``x - z_x``, ``w - z_w``), so a padded element is
0, which is exactly the float 0 that ONNX pads with. Every kernel also returns, where it matters,
``sum |x·w|`` per output: the largest magnitude any partial sum can reach in whatever order a
runtime adds the products (what decides whether a float32 accumulation is exact).

Products go through BLAS where that is provably exact. A float format holds every integer up to
its limit exactly (2^24 for float32, 2^53 for float64), so a product accumulation whose products
and partial sums are integers within that limit is exact in any order, blocking or FMA the BLAS
uses. Before each convolution or matrix product the kernel bounds them (:func:`plan`):

* ``max|x| · max_o sum_k |w[o, k]|`` (no partial sum of ``x·w[o]`` nor of ``|x|·|w[o]|`` exceeds
  it) within 2^24: one float32 product;
* otherwise, while a single product ``max|x| · max|w|`` is within 2^24, float32 products over
  slices of the reduction axis, each slice's bound ``max|x| · sum_(k in slice) max_o |w[o, k]|``
  within 2^24, the slices' exact results added in int64;
* otherwise ``max|x| · max_o sum_k |w[o, k]|`` below 2^53: one float64 product;
* otherwise int64 products (numpy's own loops, no BLAS).

All four give the same integers. :func:`products` forces a path (``"int64"``: the plain reference,
``"float64"``: one float64 product wherever the bound allows it).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

FLOAT32_EXACT = 2 ** 24   # every integer of magnitude up to this is a float32
FLOAT64_EXACT = 2 ** 53   # ... a float64
PRODUCT_MODES = ("auto", "float64", "int64")
MIN_SLICE = 64            # float32 slices shorter than this on average: float64 instead
_mode = "auto"


@contextmanager
def products(mode: str):
    """Within the block, products use ``mode``: ``auto`` (the default: float32, sliced float32,
    float64 or int64, the first the bounds prove exact), ``float64`` (float64 wherever the bound is
    below 2^53, int64 beyond) or ``int64`` (no BLAS)."""
    global _mode
    if mode not in PRODUCT_MODES:
        raise ValueError(f"unknown product mode {mode!r}; choose one of: {', '.join(PRODUCT_MODES)}")
    before, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = before


class Weights:
    """An int64 weight with what the exact products need of it, computed once: ``nk`` is
    ``(..., N, K)`` (output channels, then the reduction axis; a view of the ONNX layout where it
    can be). Keeps the ``(..., K, N)`` view :attr:`w`, its row bound ``max_n sum_k |w|``, its
    column maxima ``max |w[.., :, k]|`` and its float copies (in a :func:`conv2d`/:func:`matmul`
    ``cache`` across calls)."""

    def __init__(self, nk: np.ndarray) -> None:
        self.w = np.swapaxes(nk, -1, -2)
        self.k = nk.shape[-1]
        self._floats: dict = {}
        self._nk = nk
        self._bounds = False

    @property
    def row(self) -> int:
        self._prepare()
        return self._row

    @property
    def column(self) -> np.ndarray:
        self._prepare()
        return self._column

    def _prepare(self) -> None:
        """The bounds and the float32 copy, on first use (the int64 path needs neither)."""
        if self._bounds:
            return
        self._bounds, nk = True, self._nk
        if not nk.size:
            self._row, self._column, self._f32 = 0, np.zeros(self.k, np.int64), None
            return
        peak = _max_abs(nk)  # no full-size temporary
        # weights of up to 24 bits are float32 exactly: bounds and float copies from one float32 copy
        self._f32 = np.ascontiguousarray(nk, dtype=np.float32) if peak <= FLOAT32_EXACT else None
        w_abs = np.abs(self._f32) if self._f32 is not None else np.abs(nk)
        self._row = int(w_abs.sum(axis=-1, dtype=np.float64 if self._f32 is not None else np.int64).max())
        self._column = w_abs.max(axis=tuple(range(nk.ndim - 1))).astype(np.int64)
        self._abs = w_abs

    def floats(self, dtype, nonneg: bool):
        """``[w | |w|]`` (``nonneg``) or ``(w, |w|)`` in ``dtype``, as ``(..., K, N)`` views of
        ``(..., N, K)`` arrays (BLAS reads them transposed, no copy)."""
        key = (np.dtype(dtype).name, nonneg)
        if key not in self._floats:
            self._prepare()
            if self._f32 is not None:
                nk, nk_abs = self._f32.astype(dtype, copy=False), self._abs.astype(dtype, copy=False)
            else:
                nk = np.ascontiguousarray(np.swapaxes(self.w, -1, -2)).astype(dtype)
                nk_abs = np.abs(nk)
            pair = (np.concatenate([nk, nk_abs], axis=-2),) if nonneg else (nk, nk_abs)
            views = tuple(np.swapaxes(a, -1, -2) for a in pair)
            self._floats[key] = views[0] if nonneg else views
        return self._floats[key]


def plan(x_max: int, weights: Weights) -> tuple[type | None, list[tuple[int, int]]]:
    """``(dtype, slices)`` of the exact product of activations bounded by ``x_max`` with
    ``weights``: dtype None means int64, ``slices`` the ``[k0, k1)`` ranges of the reduction axis
    each computed in one float product (module docstring)."""
    k = weights.k
    if _mode == "int64" or not weights.w.size:  # (before the bounds: the int64 path computes none)
        return None, [(0, k)]
    tight = x_max * weights.row
    if _mode == "auto" and tight <= FLOAT32_EXACT:
        return np.float32, [(0, k)]
    column = weights.column * x_max
    if _mode == "auto" and int(column.max()) <= FLOAT32_EXACT:
        ends = np.cumsum(column)
        slices, start, base = [], 0, 0
        while start < k:
            end = int(np.searchsorted(ends, base + FLOAT32_EXACT, side="right"))
            slices.append((start, end))
            base, start = int(ends[end - 1]), end
        if len(slices) * MIN_SLICE <= k:
            return np.float32, slices
    if tight < FLOAT64_EXACT:
        return np.float64, [(0, k)]
    return None, [(0, k)]


def _products(cols: np.ndarray, weights: Weights, nonneg: bool, dtype, slices):
    """``(cols @ w, |cols| @ |w|)`` as int64; ``cols`` already of ``dtype`` (int64 for None)."""
    w = weights.w
    if dtype is None:
        return np.matmul(cols, w), np.matmul(np.abs(cols), np.abs(w))
    n = w.shape[-1]
    if nonneg:  # |cols| = cols: one product of twice the width, cols @ [w | |w|]
        wb = weights.floats(dtype, True)
    else:
        (wf, wa), cols_abs = weights.floats(dtype, False), np.abs(cols)
    acc = abs_sum = None
    for k0, k1 in slices:
        if nonneg:
            both = np.matmul(cols[..., k0:k1], wb[..., k0:k1, :])
            a, b = both[..., :n], both[..., n:]
        else:
            a, b = np.matmul(cols[..., k0:k1], wf[..., k0:k1, :]), np.matmul(cols_abs[..., k0:k1], wa[..., k0:k1, :])
        a, b = a.astype(np.int64), b.astype(np.int64)
        acc, abs_sum = (a, b) if acc is None else (acc + a, abs_sum + b)
    return acc, abs_sum


def _weights(w: np.ndarray, layout, cache: dict | None) -> Weights:
    if cache is not None and "weights" in cache:
        return cache["weights"]
    weights = Weights(layout(w))
    if cache is not None:
        cache["weights"] = weights
    return weights


def _max_abs(x: np.ndarray) -> int:
    return int(max(-int(x.min()), int(x.max()))) if x.size else 0


def _out_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int,
              ceil: bool) -> int:
    span = dilation * (kernel - 1) + 1
    room = size + pad_begin + pad_end - span
    out = (-(-room // stride) if ceil else room // stride) + 1
    if ceil and (out - 1) * stride >= size + pad_begin:
        out -= 1  # ONNX: a window that starts in the right padding is dropped
    return out


def windows(x: np.ndarray, kernel, strides, pads, dilations, fill: int, ceil: bool = False) -> np.ndarray:
    """A view ``(N, C, OH, OW, KH, KW)`` of ``x`` padded with ``fill``; pads are ONNX ``[t, l, b, r]``."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    oh = _out_size(h, kh, sh, pads[0], pads[2], dh, ceil)
    ow = _out_size(w, kw, sw, pads[1], pads[3], dw, ceil)
    extra_b = max(0, (oh - 1) * sh + dh * (kh - 1) + 1 - (h + pads[0] + pads[2]))
    extra_r = max(0, (ow - 1) * sw + dw * (kw - 1) + 1 - (w + pads[1] + pads[3]))
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2] + extra_b), (pads[1], pads[3] + extra_r)),
                    constant_values=fill)
    s = padded.strides
    shape = (n, c, oh, ow, kh, kw)
    view_strides = (s[0], s[1], s[2] * sh, s[3] * sw, s[2] * dh, s[3] * dw)
    return np.lib.stride_tricks.as_strided(padded, shape, view_strides, writeable=False)


def conv2d(x: np.ndarray, w: np.ndarray, strides, pads, dilations, group: int, cache: dict | None = None):
    """Integer 2-D convolution: ``(acc, abs_sum)``, both int64 ``(N, O, OH, OW)``. ``cache``: a
    dict kept with the weight (the same ``w`` on every call) for what is derived from it."""
    o, cg, kh, kw = w.shape
    og, k = o // group, cg * kh * kw
    weights = _weights(w, lambda v: v.reshape(group, og, k), cache)  # (group, O/group, K)
    dtype, slices = plan(_max_abs(x), weights)
    nonneg = bool(x.size) and int(x.min()) >= 0
    win = windows(x if dtype is None else x.astype(dtype), (kh, kw), strides, pads, dilations, 0)
    n, c, oh, ow = win.shape[:4]
    # (group, N·OH·OW, K) columns times (group, K, O/group) weights: one batched product
    cols = win.reshape(n, group, cg, oh, ow, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6).reshape(group, n * oh * ow, k)
    acc, abs_sum = _products(cols, weights, nonneg, dtype, slices)

    def nchw(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape(group, n, oh, ow, og).transpose(1, 0, 4, 2, 3).reshape(n, o, oh, ow))

    return nchw(acc), nchw(abs_sum)


def matmul(a: np.ndarray, b: np.ndarray, cache: dict | None = None):
    """Integer ``a @ b`` (``b`` is ``(K, N)``): ``(acc, abs_sum)`` in int64; ``cache`` as for
    :func:`conv2d`, kept with ``b``."""
    weights = _weights(b, lambda v: np.swapaxes(v, -1, -2), cache)
    dtype, slices = plan(_max_abs(a), weights)
    nonneg = bool(a.size) and int(a.min()) >= 0
    return _products(a if dtype is None else a.astype(dtype), weights, nonneg, dtype, slices)


def max_pool(x: np.ndarray, kernel, strides, pads, dilations, ceil: bool) -> np.ndarray:
    """Max over each window; padding never wins (it is below every int64 value used here)."""
    fill = np.iinfo(np.int64).min
    return windows(x, kernel, strides, pads, dilations, fill, ceil).max(axis=(4, 5))


def sum_pool(x: np.ndarray, kernel, strides, pads, count_include_pad: bool):
    """``(sums, counts)``: integer window sums and the number of elements each average divides by."""
    sums = windows(x, kernel, strides, pads, (1, 1), 0).sum(axis=(4, 5), dtype=np.int64)
    if count_include_pad:
        counts = np.full(sums.shape, kernel[0] * kernel[1], dtype=np.int64)
    else:
        ones = np.ones((1, 1) + x.shape[2:], dtype=np.int64)
        counts = windows(ones, kernel, strides, pads, (1, 1), 0).sum(axis=(4, 5))
        counts = np.broadcast_to(counts, sums.shape)
    return sums, counts
