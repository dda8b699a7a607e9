"""The integer reference's exact BLAS products (convert/intref/kernels.py): float32, float32 over
slices of the reduction axis, float64 or int64, whichever each layer's partial-sum bound proves
exact, give the same integers as the plain int64 products, bit for bit, on real files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import randomize
from torch import nn

from wnconvert.convert.actquant import ActQuantConfig, calibrate, export_qdq, freeze_bn, prepare_qat
from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.intref import kernels, read_graph, run_integer
from wnconvert.convert.schemes import SchemeConfig


class _Net(nn.Module):
    """conv+BN+ReLU, max pooling, a 256-channel 3x3 conv (2304 products per output) with a
    residual add, global average pooling, linear: the shapes of a ResNet's later layers, small."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2 = nn.Conv2d(16, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256)
        self.conv3, self.bn3 = nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256)
        self.avg, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(256, 10)

    def forward(self, x):
        h = torch.relu(self.bn2(self.conv2(self.pool(torch.relu(self.bn1(self.conv1(x)))))))
        return self.fc(torch.flatten(self.avg(torch.relu(self.bn3(self.conv3(h)) + h)), 1))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The network with power-of-two scales exported W8A8 and W4A4 (int8 container)."""
    out = {}
    for bits in (8, 4):
        torch.manual_seed(bits)
        model = randomize(_Net(), seed=bits)
        apply_scheme(model, SchemeConfig("channel-max", weight_bits=bits))
        q = prepare_qat(model, ActQuantConfig(bits, scale_format="po2"))
        calibrate(q, [torch.randn(4, 3, 16, 16)])
        freeze_bn(q)
        path = tmp_path_factory.mktemp("fast") / f"w{bits}a{bits}.onnx"
        export_qdq(q, path, example_shape=(1, 3, 16, 16), container="int8")
        out[bits] = path
    return out


def _plans(monkeypatch) -> list:
    seen = []
    original = kernels.plan

    def spy(x_max, weights):
        p = original(x_max, weights)
        seen.append((None if p[0] is None else np.dtype(p[0]).name, len(p[1])))
        return p
    monkeypatch.setattr(kernels, "plan", spy)
    return seen


def _same(a, b) -> None:
    assert list(a.tensors) == list(b.tensors)
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert t.values.dtype == u.values.dtype and np.array_equal(t.values, u.values), name
        assert (t.max_abs_acc, t.max_abs_partial, t.shift, t.integer_only) == \
               (u.max_abs_acc, u.max_abs_partial, u.shift, u.integer_only), name


@pytest.mark.parametrize("bits", [8, 4])
def test_every_product_path_gives_the_int64_reference_bit_for_bit(files, bits, monkeypatch):
    x = np.random.default_rng(bits).standard_normal((3, 3, 16, 16)).astype(np.float32) * 2
    graph = read_graph(files[bits])
    seen = _plans(monkeypatch)
    with kernels.products("int64"):
        plain = run_integer(files[bits], x)
    assert seen and {d for d, _ in seen} == {None}
    seen.clear()
    fast = run_integer(graph, x)            # auto: float32, sliced float32 or float64 per layer
    paths = set(seen)
    _same(plain, fast)
    with kernels.products("float64"):
        _same(plain, run_integer(graph, x))
    assert plain.integer_only and len(plain.tensors) > 6
    if bits == 4:   # 4-bit values: every bound within 2^24, one float32 product per layer
        assert paths == {("float32", 1)}
    else:           # 8-bit values: some layers' bound exceeds 2^24, they go in float32 slices
        assert ("float32", 1) in paths and any(d == "float32" and n > 1 for d, n in paths)


def _exact(x, w):
    return np.array([[sum(int(a) * int(b) for a, b in zip(row, col)) for col in w.T] for row in x], dtype=object)


@pytest.mark.parametrize("x_max, expect", [(255, ("float32", 2)), (2 ** 20, ("float64", 1)),
                                           (2 ** 40, (None, 1))])
def test_bounds_pick_an_exact_path_where_a_plain_float32_product_is_not(x_max, expect, monkeypatch):
    rng = np.random.default_rng(0)
    k = 4608
    x = rng.integers(-x_max, x_max + 1, (4, k), dtype=np.int64)
    x[0, :] = rng.integers(x_max // 2, x_max + 1, k)   # partial sums far beyond 2^24, odd ones:
    w = rng.integers(-127, 128, (k, 3), dtype=np.int64)  # a plain float32 product rounds them
    w[:, 0] = rng.integers(64, 128, k)
    w[0, 0] = 127
    seen = _plans(monkeypatch)
    acc, abs_sum = kernels.matmul(x, w)
    assert seen[0][0] == expect[0] and (seen[0][1] >= expect[1])
    assert acc.dtype == abs_sum.dtype == np.int64
    assert np.array_equal(acc.astype(object), _exact(x, w))
    assert np.array_equal(abs_sum.astype(object), _exact(np.abs(x), np.abs(w)))
    plain32 = (x.astype(np.float32) @ w.astype(np.float32)).astype(np.float64)
    assert not np.array_equal(plain32, acc.astype(np.float64))   # what the bound protects from


def test_grouped_convolution_matches_the_int64_path():
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (2, 8, 9, 9), dtype=np.int64)
    w = rng.integers(-127, 128, (12, 2, 3, 3), dtype=np.int64)
    fast = kernels.conv2d(x, w, (2, 1), (1, 0, 1, 2), (1, 2), 4)
    with kernels.products("int64"):
        plain = kernels.conv2d(x, w, (2, 1), (1, 0, 1, 2), (1, 2), 4)
    # a direct sum over the window of group g for one output element
    n, o, i, j = 1, 7, 3, 2
    g, ph, pw = o // 3, 1, 0
    direct = sum(int(x[n, g * 2 + c, i * 2 - ph + a, j - pw + 2 * b]) * int(w[o, c, a, b])
                 for c in range(2) for a in range(3) for b in range(3)
                 if 0 <= i * 2 - ph + a < 9 and 0 <= j - pw + 2 * b < 9)
    assert fast[0][n, o, i, j] == direct
    assert np.array_equal(fast[0], plain[0]) and np.array_equal(fast[1], plain[1])
