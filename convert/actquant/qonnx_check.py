"""The check of a QONNX file (:mod:`.export_qonnx`) with qonnx's own executor.

qonnx's ``execute_onnx`` runs the file node by node (``Quant`` in numpy, the standard operators in
one-node onnxruntime sessions); the integers at each activation ``Quant`` are its output divided by
its scale. They are compared, point by point in graph order, with

* the run's QDQ file in onnxruntime, optimizations off and on (``Q_<point>`` outputs,
  :class:`~.ort_points.OrtPoints`), and
* the pure-integer reference of that QDQ file (:func:`~wnconvert.convert.intref.run_integer`).

**Bit-exact** (power-of-two runs): all four hold the same integers on every element, free-running
from the same float images; every ``Quant`` scale of the file must be an exact power of two.
**Lossless-activations** (float scales): the eval-mode fake-quant model, re-run with each point
taken from qonnx's integers (:class:`~.lossless._Forced`), agrees with qonnx at every point except
one-step differences at float rounding ties; the free-running counts against onnxruntime and the
integer reference are reported, not judged (a tie may round either way there).

The first failure names the first differing point and its ``Quant`` node.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx

from ..errors import UserInputError
from ..intref import run_integer
from ..reading import load_onnx
from .export_qonnx import _with_shapes, quant_nodes
from .lossless import TIE_WINDOW, _Forced
from .ort_points import OrtPoints
from .prepare import act_points

SOURCES = ("ort_off", "ort_on", "intref")
BATCH = 64


def _qonnx_modules():
    try:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.core.onnx_exec import execute_onnx
    except ImportError:
        raise UserInputError("checking a QONNX file needs the qonnx package (pip install qonnx; "
                             "wnconvert's test extra)") from None
    return ModelWrapper, execute_onnx


class QonnxPoints:
    """qonnx's executor on a QONNX file, reading the integers at every activation ``Quant``."""

    def __init__(self, path: Path) -> None:
        self.model = load_onnx(path, "qonnx")
        inits = {i.name: i for i in self.model.graph.initializer}
        self.nodes = {}   # point -> (node name, output tensor, scale)
        for n in quant_nodes(self.model):
            if n.input[0] in inits:   # a weight
                continue
            point = n.doc_string or n.name.removeprefix("Quant_")
            if n.input[1] not in inits:
                raise UserInputError(f"{path}: Quant node {n.name!r} has no constant scale")
            self.nodes[point] = (n.name, n.output[0], numpy_helper.to_array(inits[n.input[1]]).astype(np.float32))
        if not self.nodes:
            raise UserInputError(f"{path} holds no activation Quant node: not a QONNX file of an --act-bits run")
        self._batch: dict[int, object] = {}

    def _wrapper(self, n: int):
        if n not in self._batch:
            ModelWrapper, _ = _qonnx_modules()
            m = onnx.ModelProto()
            m.CopyFrom(self.model)
            for v in (*m.graph.input, *m.graph.output):
                v.type.tensor_type.shape.dim[0].dim_value = n
            self._batch[n] = ModelWrapper(_with_shapes(m))
        return self._batch[n]

    def run(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``({point: integers as int64}, logits)`` on the float NCHW images ``x``."""
        _, execute_onnx = _qonnx_modules()
        x = np.ascontiguousarray(x, np.float32)
        mw = self._wrapper(len(x))
        ctx = execute_onnx(mw, {mw.graph.input[0].name: x}, return_full_exec_context=True)
        ints = {}
        for point, (_, tensor, scale) in self.nodes.items():
            ints[point] = np.rint(np.asarray(ctx[tensor], np.float32) / scale).astype(np.int64)
        return ints, np.asarray(ctx[mw.graph.output[0].name])


def _structure(model: onnx.ModelProto, po2: bool) -> list[str]:
    """A power-of-two run's file: every Quant scale an exact power of two."""
    if not po2:
        return []
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for n in quant_nodes(model):
        s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32).reshape(-1) if n.input[1] in inits else None
        if s is None or not (np.all(s > 0) and np.all((s.view(np.uint32) & 0x7FFFFF) == 0)):
            out.append(f"Quant node {n.name!r}: scale is not a power of two")
    return out


def _intref_points(qdq: onnx.ModelProto, points: list[str], x: np.ndarray) -> dict[str, np.ndarray] | None:
    """The integer reference's integers at every point; None where it cannot run the file (a
    mixed-precision file's float operations)."""
    try:
        run = run_integer(qdq, x)
    except UserInputError:
        return None
    return {p: run.tensors[f"{p}_q"].values.astype(np.int64) - run.tensors[f"{p}_q"].zero_point
            for p in points if f"{p}_q" in run.tensors}


@torch.no_grad()
def check_qonnx(qat_model: fx.GraphModule, qonnx_path: Path, qdq_path: Path, x: torch.Tensor, *,
                po2: bool, batch_size: int = BATCH) -> dict:
    """Compare ``qonnx_path`` in qonnx's executor with the QDQ file ``qdq_path`` of the same run
    (onnxruntime off and on, the integer reference) and, for float scales, with the eval-mode
    ``qat_model``, on the float NCHW images ``x``. Returns the dict ``verify`` records:
    ``contract`` "qonnx", ``mode`` bit-exact | lossless-activations, ``passed``, ``failures``
    (the first differing point first), one row per point and ``first_difference``."""
    if len(x) == 0:
        raise UserInputError("the QONNX check needs at least one image")
    was_training = qat_model.training
    qat_model.eval()
    try:
        points = [p.name for p in act_points(qat_model)]
        qp = QonnxPoints(Path(qonnx_path))
        qdq = load_onnx(qdq_path)
        sessions = {"ort_off": OrtPoints(Path(qdq_path), points, False),
                    "ort_on": OrtPoints(Path(qdq_path), points, True)}
        rows = {p: {"point": p, "quant_node": qp.nodes[p][0] if p in qp.nodes else None, "elements": 0,
                    "differ": 0, "mismatches": dict.fromkeys(SOURCES, 0), "forced": None} for p in points}
        forced_stats: dict[str, dict] = {}
        x = x.float()
        sources = list(SOURCES)
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            mine, _ = qp.run(xb.numpy())
            theirs = {lvl: s.run(xb.numpy())[0] for lvl, s in sessions.items()}
            ir = _intref_points(qdq, points, xb.numpy())
            if ir is None:
                sources = [s for s in sources if s != "intref"]
            else:
                theirs["intref"] = ir
            for p in points:
                r, a = rows[p], mine.get(p)
                if a is None:
                    continue
                r["elements"] += a.size
                differ = np.zeros(a.shape, bool)
                for src in sources:
                    b = theirs[src].get(p)
                    ne = np.ones(a.shape, bool) if b is None or b.shape != a.shape else a != b
                    r["mismatches"][src] += int(np.count_nonzero(ne))
                    differ |= ne
                r["differ"] += int(np.count_nonzero(differ))
            if not po2:
                f = _Forced(qat_model, mine, TIE_WINDOW)
                f.run(xb)
                for p, st in f.stats.items():
                    acc = forced_stats.setdefault(p, {"elements": 0, "differ": 0, "at_ties": 0, "off_ties": 0,
                                                      "missing": False})
                    if st.get("missing"):
                        acc["missing"] = True
                        continue
                    for k in ("elements", "differ", "at_ties", "off_ties"):
                        acc[k] += st[k]
        failures = _structure(qp.model, po2)
        missing = [p for p in points if p not in qp.nodes]
        failures += [f"point {p}: no Quant node in the file" for p in missing]
        for p, st in forced_stats.items():
            rows[p]["forced"] = st
        if po2:
            bad = [r for r in rows.values() if r["differ"] and r["quant_node"]]
        else:
            bad = [rows[p] for p in points if (forced_stats.get(p, {}).get("off_ties")
                                               or forced_stats.get(p, {}).get("missing")) and rows[p]["quant_node"]]
        if bad:
            r = bad[0]
            pairs = ", ".join(f"qonnx/{s} {n}" for s, n in r["mismatches"].items() if n)
            if po2:
                what = f"{r['differ']} of {r['elements']} integers differ ({pairs})"
            else:
                st = r["forced"] or {}
                what = (f"{st.get('off_ties', 0)} of {st.get('elements', 0)} integers differ from the trained "
                        f"model beyond a rounding tie" if not st.get("missing") else "shape differs from the trained "
                                                                                     "model")
            failures.insert(0, f"first difference at point {r['point']} (Quant node {r['quant_node']!r}): {what}")
        first = next((r for r in rows.values() if r["differ"]), None)
        total = sum(r["elements"] for r in rows.values())
        return {"contract": "qonnx", "mode": "bit-exact" if po2 else "lossless-activations",
                "passed": not failures, "failures": failures, "images": len(x),
                "sources": ["qonnx", *sources], "elements": total,
                "equal": {s: total - sum(r["mismatches"][s] for r in rows.values()) for s in sources},
                "points": list(rows.values()),
                "first_difference": None if first is None else {k: first[k] for k in ("point", "quant_node", "differ",
                                                                                        "elements")}}
    finally:
        qat_model.train(was_training)
