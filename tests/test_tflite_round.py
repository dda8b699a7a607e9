"""TFLite's requantization arithmetic in torch (convert/actquant/tflite_round.py) against TensorFlow
Lite Micro on tiny one-op files: equal integers on every element."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tflite_micro")

from tflite_tiny import Builder, run_micro

from wnconvert.convert.actquant import tflite_round as tr


def test_known_values():
    # 0.25 -> 2^30 and shift -1: 85/2 -> 43 (half up), 43/2 -> 22 (half away): two roundings
    assert tr.quantize_multiplier(0.25) == (1 << 30, -1)
    assert tr.mbqm(torch.tensor([85, -85, 12927]), 1 << 30, -1).tolist() == [22, -21, 3232]
    assert tr.requantize(torch.tensor([12927]), 2.0 ** -8).tolist() == [51]   # 50.496 -> 50.5 -> 51
    assert tr.rdbpot(torch.tensor([5, -5, 6, -6, 7]), 1).tolist() == [3, -3, 3, -3, 4]
    assert tr.srdhm(torch.tensor([-85]), 1 << 30).tolist() == [-42]   # a negative tie goes toward zero


def _conv_case(rng, cin, cout, multipliers_po2: bool):
    s_in = 2.0 ** -4
    w = rng.integers(-20, 21, (cout, 3, 3, cin)).astype(np.int8)   # outputs mostly unsaturated
    if multipliers_po2:
        s_w = 2.0 ** rng.integers(-9, -5, cout).astype(np.float64)
        s_out = 2.0 ** -3
    else:
        s_w = rng.uniform(0.002, 0.02, cout)
        s_out = 0.0731
    bias = rng.integers(-3000, 3000, cout).astype(np.int32)
    return s_in, w, s_w.astype(np.float32), bias, s_out


@pytest.mark.parametrize("po2", [True, False])
@pytest.mark.parametrize("unsigned_in", [True, False])
def test_conv_requantization_equals_tflite_micro(po2, unsigned_in):
    rng = np.random.default_rng(3 + po2 + 2 * unsigned_in)
    cin, cout = 5, 6
    s_in, w, s_w, bias, s_out = _conv_case(rng, cin, cout, po2)
    zp_in = -128 if unsigned_in else 0
    k_in = rng.integers(0, 256, (1, 16, 16, cin)) if unsigned_in else rng.integers(-128, 128, (1, 16, 16, cin))
    b = Builder()
    x = b.tensor(k_in.shape, np.int8, s_in, zp_in)
    y = b.conv(x, w, s_w, bias, s_out, 0)
    micro = run_micro(b.finish([x], [y]), (k_in + zp_in).astype(np.int8)).astype(np.int64)
    # the accumulator in torch (NCHW), then TFLite's requantization per channel
    xt = torch.from_numpy(k_in.transpose(0, 3, 1, 2).astype(np.float64))
    wt = torch.from_numpy(w.transpose(0, 3, 1, 2).astype(np.float64))
    bias64 = torch.from_numpy(bias.astype(np.int64)).reshape(1, -1, 1, 1)
    acc = torch.nn.functional.conv2d(xt, wt, padding=1).round().to(torch.int64) + bias64
    real = np.float64(np.float32(s_in)) * s_w.astype(np.float64) / np.float64(np.float32(s_out))
    ours = tr.requantize(acc, torch.from_numpy(real)).clamp(-128, 127).numpy().transpose(0, 2, 3, 1)
    assert np.array_equal(ours, micro)
    # and the double rounding matters: a single round-half-even differs somewhere on these files
    single = torch.round(acc.double() * torch.from_numpy(real).reshape(1, -1, 1, 1)).clamp(-128, 127)
    assert po2 is False or not np.array_equal(single.numpy().transpose(0, 2, 3, 1), micro)


@pytest.mark.parametrize("scales", [(2.0 ** -3, 2.0 ** -5, 2.0 ** -4), (0.031, 0.0177, 0.0412),
                                    (2.0 ** -4, 2.0 ** -4, 2.0 ** -4)])
def test_add_equals_tflite_micro(scales):
    s1, s2, so = scales
    rng = np.random.default_rng(11)
    shape = (1, 16, 16, 4)
    k1 = rng.integers(0, 256, shape)     # unsigned: stored with zero point -128
    k2 = rng.integers(-128, 128, shape)  # signed: zero point 0
    b = Builder()
    a = b.tensor(shape, np.int8, s1, -128)
    c = b.tensor(shape, np.int8, s2, 0)
    y = b.add(a, c, so, 0)
    micro = run_micro(b.finish([a, c], [y]), (k1 - 128).astype(np.int8), k2.astype(np.int8)).astype(np.int64)
    ours = tr.add(torch.from_numpy(k1), s1, torch.from_numpy(k2), s2, so).clamp(-128, 127).numpy()
    assert np.array_equal(ours, micro)


@pytest.mark.parametrize("hw,scales", [(4, (2.0 ** -3, 2.0 ** -4)), (3, (2.0 ** -3, 2.0 ** -3)), (5, (0.05, 0.021))])
def test_mean_equals_tflite_micro(hw, scales):
    s_in, s_out = scales
    rng = np.random.default_rng(hw)
    k = rng.integers(0, 256, (1, hw, hw, 32))
    b = Builder()
    x = b.tensor(k.shape, np.int8, s_in, -128)
    y = b.mean(x, s_out, -128)
    micro = run_micro(b.finish([x], [y]), (k - 128).astype(np.int8)).astype(np.int64) + 128
    total = torch.from_numpy(k).sum(dim=(1, 2))
    ours = tr.mean(total, hw * hw, s_in, s_out).clamp(0, 255).numpy()
    assert np.array_equal(ours, micro)


def test_avg_pool_equals_tflite_micro():
    rng = np.random.default_rng(5)
    k = rng.integers(-128, 128, (1, 8, 8, 8))
    b = Builder()
    x = b.tensor(k.shape, np.int8, 0.1, 0)
    y = b.avgpool(x, 2)
    micro = run_micro(b.finish([x], [y]), k.astype(np.int8)).astype(np.int64)
    total = torch.from_numpy(k).reshape(1, 4, 2, 4, 2, 8).sum(dim=(2, 4))
    assert np.array_equal(tr.avg_pool_round(total, 4).numpy(), micro)
