"""Integer kernels on int64 numpy arrays (NCHW): convolution, matrix product, max and sum pooling.

Inputs are already offset by their zero points (``x - z_x``, ``w - z_w``), so a padded element is
0, which is exactly the float 0 that ONNX pads with. Every kernel also returns, where it matters,
``sum |x·w|`` per output: the largest magnitude any partial sum can reach in whatever order a
runtime adds the products (what decides whether a float32 accumulation is exact).
"""

from __future__ import annotations

import numpy as np


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


def conv2d(x: np.ndarray, w: np.ndarray, strides, pads, dilations, group: int):
    """Integer 2-D convolution: ``(acc, abs_sum)``, both int64 ``(N, O, OH, OW)``."""
    o, cg, kh, kw = w.shape
    win = windows(x, (kh, kw), strides, pads, dilations, 0)
    n, c, oh, ow = win.shape[:4]
    og = o // group
    accs, abss = [], []
    for g in range(group):
        cols = win[:, g * cg:(g + 1) * cg].transpose(0, 2, 3, 1, 4, 5).reshape(n, oh * ow, cg * kh * kw)
        wg = w[g * og:(g + 1) * og].reshape(og, cg * kh * kw).T
        accs.append(np.matmul(cols, wg))
        abss.append(np.matmul(np.abs(cols), np.abs(wg)))
    acc = np.concatenate(accs, axis=2).reshape(n, oh, ow, o).transpose(0, 3, 1, 2)
    abs_sum = np.concatenate(abss, axis=2).reshape(n, oh, ow, o).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(acc), np.ascontiguousarray(abs_sum)


def matmul(a: np.ndarray, b: np.ndarray):
    """Integer ``a @ b`` (``b`` is ``(K, N)``): ``(acc, abs_sum)`` in int64."""
    return np.matmul(a, b), np.matmul(np.abs(a), np.abs(b))


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
