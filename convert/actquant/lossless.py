"""The lossless-activations check: the QDQ file reproduces the eval-mode fake-quant model.

For every quantization point the integers onnxruntime holds (the output of ``Q_<point>``, read as
an extra graph output) are compared with the integers the PyTorch model computes *from the same
inputs*: the fake-quant graph is re-run with each point's output replaced by onnxruntime's
integers (times the scale), so a difference is local to the layer that made it and does not spread.
A difference is allowed only where it is one step and the PyTorch value ``x / s`` lies within
``tie_window`` (in steps) of a rounding tie: there float32 summation order decides the rounding.
Both onnxruntime optimization levels are checked (off: float kernels between Q/DQ; on: fused
integer kernels). Logits: same top-1 wherever the PyTorch logits' top two are more than one step
apart (compared free-running, without the substitution).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import fx

from .ort_points import ort_point_integers
from .prepare import act_points, quantizers
from .tflite_points import onnx_rounding

TIE_WINDOW = 1.0 / 128   # steps: |x/s - (k + 1/2)| below this is a rounding tie


class _Forced(fx.Interpreter):
    """Runs the fake-quant graph with each point's output taken from onnxruntime."""

    def __init__(self, gm: fx.GraphModule, ort_ints: dict, tie_window: float) -> None:
        super().__init__(gm)
        self.ort_ints, self.tie_window = ort_ints, tie_window
        self.stats: dict[str, dict] = {}

    def call_module(self, target, args, kwargs):
        if not target.startswith("act_quant."):
            return super().call_module(target, args, kwargs)
        point = target.split(".", 1)[1]
        q = self.module.get_submodule(target)
        k_pt, v = q.integers(args[0])
        theirs = self.ort_ints.get(point)
        if theirs is None or tuple(theirs.shape) != tuple(k_pt.shape):
            self.stats[point] = {"missing": True}
            return k_pt * q.scale()
        k_ort = torch.from_numpy(theirs).to(k_pt.dtype)
        diff = (k_ort - k_pt).abs()
        frac = (v.double() - torch.floor(v.double()) - 0.5).abs()
        tie = (frac <= self.tie_window) & (v >= q.qmin - 0.5) & (v <= q.qmax + 0.5)
        self.stats[point] = {"elements": int(diff.numel()), "differ": int((diff > 0).sum()),
                             "at_ties": int(((diff == 1) & tie).sum()),
                             "off_ties": int(((diff > 0) & ~((diff == 1) & tie)).sum()),
                             "max_steps": int(diff.max()) if diff.numel() else 0}
        return (k_ort * q.scale()).to(args[0].dtype)


@onnx_rounding
@torch.no_grad()
def check_lossless_activations(qat_model: fx.GraphModule, onnx_path: Path, x: torch.Tensor,
                               tie_window: float = TIE_WINDOW) -> dict:
    """Compare ``onnx_path`` with the eval-mode ``qat_model`` on images ``x`` (float NCHW).
    Returns ``{"passed", "failures", "levels": {"off"|"on": {"points", "logits"}}}``."""
    was_training = qat_model.training
    qat_model.eval()
    try:
        points = [p.name for p in act_points(qat_model)]
        ref = qat_model(x).float()
        step = quantizers(qat_model)[points[-1]].scale_value()
        result = {"passed": True, "failures": [], "tie_window": tie_window, "levels": {}}
        for level, optimized in (("off", False), ("on", True)):
            ints, logits = ort_point_integers(Path(onnx_path), points, x.numpy(), optimized)
            forced = _Forced(qat_model, ints, tie_window)
            forced.run(x)
            top = _top1(ref.numpy(), logits, step)
            result["levels"][level] = {"points": forced.stats, "logits": top}
            for p in points:
                st = forced.stats.get(p, {"missing": True})
                if st.get("missing") or st["off_ties"]:
                    result["failures"].append(f"{level}: point {p}: " + (
                        "not in the file" if st.get("missing") else
                        f"{st['off_ties']} of {st['elements']} integers differ beyond a rounding tie "
                        f"(max {st['max_steps']} steps)"))
            if top["disagree"]:
                result["failures"].append(f"{level}: top-1 differs on {top['disagree']} of "
                                          f"{top['compared']} images with a clear margin")
        result["passed"] = not result["failures"]
        return result
    finally:
        qat_model.train(was_training)


def _top1(ref: np.ndarray, got: np.ndarray, step: float) -> dict:
    srt = np.sort(ref, axis=1)
    clear = (srt[:, -1] - srt[:, -2]) > step * (1 + 1e-6)
    agree = ref.argmax(1) == got.argmax(1)
    return {"compared": int(clear.sum()), "disagree": int((clear & ~agree).sum()),
            "max_abs_diff": float(np.abs(ref - got).max()) if ref.size else 0.0}
