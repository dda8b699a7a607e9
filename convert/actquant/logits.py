"""The logits under the lossless-activations contract: what the file computes after its last
quantization point, and how far the rounding ties before it may move them.

Two checks, per onnxruntime optimization level:

* **After the last point** (``after_last_point``): the fake-quant graph re-run with every point's
  output taken from onnxruntime (``lossless._Forced``) computes, from the file's own integers,
  the logits the trained model would; the file's logits must equal them up to float32 rounding
  (``AFTER_RTOL`` of the largest logit). A scaled or shifted logit, a changed zero point or scale
  of the last DequantizeLinear, an extra operation after it: all fail here, whatever the ties.
* **Free-running** (``bound``): the file's logits against the eval-mode fake-quant model's, both
  from the images. Upstream rounding ties (counted at each point, each one step) change the
  integers that reach the classifier; the classifier (the last linear layer, read through
  flatten/dropout) turns a difference ``|Δk_j|`` at its input point (scale ``s_in``) into at most
  ``s_in · Σ_j |Δk_j| · |W_cj|`` on logit ``c`` (``W`` its deployed float weights), plus one step
  ``s_out`` of its own output point where it has one and the logit either moved or lies at a
  rounding tie. That per-image, per-class bound (its
  largest value per image is in report.json: ``logits.bound.per_image``) must hold on every
  logit, and top-1 must agree on every image whose top-1 lead over each other class exceeds the
  two classes' bounds (``clear``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from .graph_ops import is_passthrough
from .layers import QLayer, deployed_parts

AFTER_RTOL = 1e-5    # of the image's largest |logit|: float32 rounding after the last point
FLOAT_RTOL = 1e-5    # free-running: float32 summation order in a float classifier


@dataclass
class Classifier:
    layer: QLayer
    name: str
    in_point: str
    out_point: str | None      # None: the classifier writes float logits


def _skip(gm: fx.GraphModule, n):
    while isinstance(n, fx.Node) and is_passthrough(gm, n) and n.args:
        n = n.args[0]
    return n


def _point_of(n) -> str | None:
    if isinstance(n, fx.Node) and n.op == "call_module" and str(n.target).startswith("act_quant."):
        return str(n.target).split(".", 1)[1]
    return None


def find_classifier(gm: fx.GraphModule) -> Classifier | None:
    """The linear layer whose output (through its point, if any) is the graph's output, and the
    point its input integers come from; None for a graph that does not end that way."""
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None:
        return None
    n = _skip(gm, out.args[0])
    out_point = _point_of(n)
    if out_point is not None:
        n = _skip(gm, n.args[0])
    if not (isinstance(n, fx.Node) and n.op == "call_module" and isinstance(gm.get_submodule(n.target), QLayer)):
        return None
    layer = gm.get_submodule(n.target)
    if layer.is_conv or layer.act is not None:
        return None
    in_point = _point_of(_skip(gm, n.args[0]))
    if in_point is None:
        return None
    return Classifier(layer, str(n.target).split(".", 1)[1], in_point, out_point)


def tie_bound(cls: Classifier, k_pt: np.ndarray, k_ort: np.ndarray, s_in: float, s_out: float | None,
              out_ties: np.ndarray | None = None) -> np.ndarray:
    """``[images, classes]``: how far the integer differences at the classifier's input point
    (``k_pt`` free-running PyTorch, ``k_ort`` onnxruntime) can move each logit, plus one output
    step where the classifier has an output point and either its input differed (rounding a
    moved value) or the logit lies at a rounding tie (``out_ties``, boolean like the logits)."""
    parts = deployed_parts(cls.layer)
    w = np.abs(parts.weight_int.astype(np.float64)) * parts.weight_scale.astype(np.float64)[:, None]
    d = np.abs(k_ort.astype(np.int64) - k_pt.astype(np.int64)).reshape(len(k_pt), -1).astype(np.float64)
    bound = float(s_in) * d @ w.T
    if s_out is None:
        return bound
    step = (bound > 0) | (out_ties if out_ties is not None else True)
    return bound + float(s_out) * step


def compare_logits(ref: np.ndarray, got: np.ndarray, forced: np.ndarray, bound: np.ndarray | None,
                   step: float) -> dict:
    """The logits record of one level (module docstring); ``failures`` lists what broke.
    ``bound`` None (no classifier found): top-1 compared where the lead exceeds one ``step``."""
    ref, got, forced = (np.asarray(a, np.float64) for a in (ref, got, forced))
    out: dict = {"images": len(ref), "max_abs_diff": float(np.abs(ref - got).max()) if ref.size else 0.0}
    failures = []
    # after the last point: exact up to float32 rounding
    scale = np.abs(forced).max(axis=1, keepdims=True) if ref.size else forced
    after = np.abs(got - forced)
    bad_after = (after > AFTER_RTOL * scale + 1e-12).any(axis=1) if ref.size else np.zeros(0, bool)
    out["after_last_point"] = {"max_abs_diff": float(after.max()) if ref.size else 0.0,
                               "rtol": AFTER_RTOL, "images_beyond": int(bad_after.sum())}
    if bad_after.any():
        i = int(np.argmax(bad_after))
        failures.append(f"the logits differ from what the file's own last quantized integers give on "
                        f"{int(bad_after.sum())} of {len(ref)} images (image {i}: by {after[i].max():.4g}, "
                        f"largest logit {scale[i, 0]:.4g}): the file changes them after its last quantization point")
    top_ref, top_got = ref.argmax(1), got.argmax(1)
    if bound is None:
        srt = np.sort(ref, axis=1)
        clear = (srt[:, -1] - srt[:, -2]) > step * (1 + 1e-6)
        out["bound"] = None
    else:
        eps = FLOAT_RTOL * np.abs(ref).max(axis=1, keepdims=True)
        room = bound + eps
        beyond = (np.abs(ref - got) > room * (1 + 1e-9)).any(axis=1)
        lead = ref[np.arange(len(ref)), top_ref][:, None] - ref
        need = room[np.arange(len(ref)), top_ref][:, None] + room
        others = np.ones_like(ref, dtype=bool)
        others[np.arange(len(ref)), top_ref] = False
        clear = ((lead > need) | ~others).all(axis=1)
        per_image = bound.max(axis=1) if bound.size else np.zeros(len(ref))
        out["bound"] = {"per_image": [float(v) for v in per_image], "max": float(per_image.max(initial=0.0)),
                        "images_beyond": int(beyond.sum())}
        if beyond.any():
            i = int(np.argmax(beyond))
            failures.append(f"logits beyond what the rounding ties before the classifier can move them on "
                            f"{int(beyond.sum())} of {len(ref)} images (image {i}: differs by "
                            f"{np.abs(ref - got)[i].max():.4g}, bound {bound[i].max():.4g})")
    disagree = clear & (top_ref != top_got)
    out |= {"compared": int(clear.sum()), "disagree": int(disagree.sum())}
    if disagree.any():
        failures.append(f"top-1 differs on {int(disagree.sum())} of {int(clear.sum())} images whose lead "
                        "exceeds what rounding ties can move")
    out["failures"] = failures
    return out


@torch.no_grad()
def free_running_integers(qat_model: fx.GraphModule, point: str, x: torch.Tensor, out_point: str | None = None,
                          tie_window: float = 1.0 / 128) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The eval-mode model's logits, its integers at ``point`` and, with ``out_point``, where that
    point's values lie within ``tie_window`` steps of a rounding tie, free-running from ``x``."""
    seen: dict = {}

    def at_input(mod, args):
        seen["k"] = mod.integers(args[0])[0]

    def at_output(mod, args):
        k, v = mod.integers(args[0])
        frac = (v.double() - torch.floor(v.double()) - 0.5).abs()
        seen["ties"] = (frac <= tie_window) & (v >= mod.qmin - 0.5) & (v <= mod.qmax + 0.5)

    handles = [qat_model.get_submodule(f"act_quant.{point}").register_forward_pre_hook(at_input)]
    if out_point is not None:
        handles.append(qat_model.get_submodule(f"act_quant.{out_point}").register_forward_pre_hook(at_output))
    try:
        logits = qat_model(x).float().cpu().numpy()
    finally:
        for h in handles:
            h.remove()
    ties = seen["ties"].cpu().numpy().reshape(logits.shape) if "ties" in seen else None
    return logits, seen["k"].cpu().numpy().astype(np.int64), ties
