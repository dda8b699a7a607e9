"""The lossless-activations check: the QDQ file reproduces the eval-mode fake-quant model.

For every quantization point the integers onnxruntime holds (the output of ``Q_<point>``, read as
an extra graph output) are compared with the integers the PyTorch model computes *from the same
inputs*: the fake-quant graph is re-run with each point's output replaced by onnxruntime's
integers (times the scale), so a difference is local to the layer that made it and does not spread.
A difference is allowed only where it is one step and the PyTorch value ``x / s`` lies within
``tie_window`` (in steps) of a rounding tie: there float32 summation order decides the rounding.
Both onnxruntime optimization levels are checked (off: float kernels between Q/DQ; on: fused
integer kernels). Logits (``logits.py``): equal, up to float32 rounding, to what the file's own
integers at the last point give; free-running, within the per-image bound that the integer
differences at the classifier's input put on them, and the same top-1 wherever that bound cannot
flip it. A file holding an operation the export never writes, or one after the last point, fails
naming it (``structure.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import fx

from ..errors import ParityError
from ..reading import load_onnx
from .logits import compare_logits, find_classifier, free_running_integers, tie_bound
from .ort_points import OrtPoints
from .prepare import act_points, quantizers
from .structure import unexpected_nodes
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
                               tie_window: float = TIE_WINDOW, progress: Callable[[int], None] | None = None) -> dict:
    """Compare ``onnx_path`` with the eval-mode ``qat_model`` on images ``x`` (float NCHW).
    Returns ``{"passed", "failures", "levels": {"off"|"on": {"points", "logits"}}}``; the logits
    are checked as :mod:`.logits` says. ``progress(k)`` is called after each of the 2 levels."""
    was_training = qat_model.training
    qat_model.eval()
    try:
        points = [p.name for p in act_points(qat_model)]
        cls = find_classifier(qat_model)
        last = cls.out_point if cls is not None else points[-1]
        result = {"passed": True, "failures": [], "tie_window": tie_window, "levels": {},
                  "classifier": None if cls is None else {"layer": cls.name, "input_point": cls.in_point,
                                                         "output_point": cls.out_point}}
        model = load_onnx(onnx_path, error=ParityError)
        structural = unexpected_nodes(model, last)
        if structural:  # not the trained network's graph: nothing to compare numerically
            result["failures"] = structural
            result["passed"] = False
            return result
        if cls is not None:
            ref, k_ref, out_ties = free_running_integers(qat_model, cls.in_point, x, cls.out_point, tie_window)
        else:
            ref, k_ref, out_ties = qat_model(x).float().numpy(), None, None
        qs = quantizers(qat_model)
        step = qs[last].scale_value() if last in qs else 0.0
        for i, (level, optimized) in enumerate((("off", False), ("on", True))):
            ints, logits = OrtPoints(Path(onnx_path), points, optimized, model=model).run(x.numpy())
            forced = _Forced(qat_model, ints, tie_window)
            forced_logits = forced.run(x).float().numpy()
            bound = None
            if cls is not None and cls.in_point in ints and ints[cls.in_point].shape == k_ref.shape:
                s_out = qs[cls.out_point].scale_value() if cls.out_point else None
                bound = tie_bound(cls, k_ref, ints[cls.in_point], qs[cls.in_point].scale_value(), s_out, out_ties)
            top = compare_logits(ref, logits, forced_logits, bound, step)
            result["levels"][level] = {"points": forced.stats, "logits": top}
            point_failures = []
            for p in points:
                st = forced.stats.get(p, {"missing": True})
                if st.get("missing") or st["off_ties"]:
                    point_failures.append(f"{level}: point {p}: " + (
                        "not in the file" if st.get("missing") else
                        f"{st['off_ties']} of {st['elements']} integers differ beyond a rounding tie "
                        f"(max {st['max_steps']} steps)"))
            result["failures"] += point_failures
            # a failing point already explains free-running logits beyond the bound: name it alone
            result["failures"] += [f"{level}: {f}" for f in top.pop("failures")
                                   if not (point_failures and f.startswith("logits beyond"))]
            if progress is not None:
                progress(i + 1)
        result["passed"] = not result["failures"]
        return result
    finally:
        qat_model.train(was_training)
