"""``export RUN --target qonnx``, ``verify`` and ``golden`` of ``RUN/model.qonnx.onnx``: the trained
integer network of an ``--act-bits`` run as QONNX (``convert/actquant/export_qonnx.py``), checked
with qonnx's executor against the run's QDQ file (``convert/actquant/qonnx_check.py``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from wnconvert.convert.actquant import export_qdq, qlayers
from wnconvert.convert.actquant.export_qonnx import export_qonnx, is_qonnx
from wnconvert.convert.actquant.qonnx_check import check_qonnx
from wnconvert.convert.artifacts import atomic_path
from wnconvert.convert.errors import ParityError, UserInputError
from wnconvert.convert.golden import golden_for_file
from wnconvert.convert.reading import load_onnx

from ..files import QONNX as QONNX_FILE
from ..files import artifact_name
from .precheck import check_qonnx_values
from .rundir import Manifest, RunDir, writes_run

TARGET = "qonnx"
CONTRACT = "qonnx"
RUNTIME = "QONNX (FINN, hls4ml); checked with qonnx's executor"


def check_qonnx_request(manifest: Manifest, given: list[str]) -> None:
    """Refuse, in one line and before anything is written, what ``--target qonnx`` cannot do (.precheck)."""
    check_qonnx_values(manifest.act is not None, given)


@writes_run
def export_qonnx_run(run_dir: Path, given: list[str] | None = None) -> dict:
    """Write ``RUN_DIR/model.qonnx.onnx``; returns the entry written to
    ``report.json["quantized"]["qonnx"]``. ``given``: the options of ``export`` that were set and
    do not apply (refused). A po2 run's file must hold power-of-two scales only (ParityError,
    nothing written, otherwise)."""
    run = RunDir(run_dir)
    check_qonnx_request(run.manifest(), list(given or []))
    manifest, qat = run.load_qat()
    dst = run.path / QONNX_FILE
    with atomic_path(dst) as tmp:
        info = export_qonnx(qat, tmp, example_shape=(1, *manifest.input_shape))
        bad = [q.node for q in info.quants if not q.power_of_two]
        if manifest.po2 and bad:
            raise ParityError(f"{QONNX_FILE} of a po2 run: the scale of {bad[0]} is not a power of two; "
                              "nothing was written")
    entry = {"file": QONNX_FILE, "contract": CONTRACT, "format": "qonnx",
             "weight_bits": int(qlayers(qat)[0].weight_bits), "act_bits": manifest.act.bits,
             "scales": "trained", "scale_format": manifest.act.scale_format,
             "mixed_precision": manifest.act.mixed_precision, "residual_conv": manifest.act.residual_conv,
             "quant": [q.to_dict() for q in info.quants]} | info.to_dict()
    entry["path"] = QONNX_FILE
    record = {"name": TARGET, "runtime": RUNTIME, "settings": {"scales": "trained", "format": "qonnx"},
              "overridden": [], "rules": None, "opsets": [info.opset, info.opset]}

    def change(report: dict) -> None:
        report.setdefault("quantized", {})[TARGET] = entry
        report.setdefault("targets", {})[QONNX_FILE] = record
    run.update_report(change)
    manifest.targets[QONNX_FILE] = {"target": TARGET, "overridden": []}
    run.finish(manifest)
    return entry


def own_qdq_file(run: RunDir, manifest: Manifest) -> Path | None:
    """The run's own QDQ file of its trained network (int4 for 2..4-bit weights, else int8), if written."""
    precision = "int4" if manifest.scheme.weight_bits <= 4 else "int8"
    path = run.path / artifact_name(precision)
    return path if path.is_file() else None


def _with_qdq(run: RunDir, manifest: Manifest, qat, fn):
    """``fn(qdq_path, source)`` with the run's own QDQ file, or one written to a temporary folder
    from the same trained network when the run has none."""
    own = own_qdq_file(run, manifest)
    if own is not None:
        return fn(own, own.name)
    with tempfile.TemporaryDirectory(prefix="wnconvert-qdq-") as d:
        path = Path(d) / "trained.qdq.onnx"
        export_qdq(qat, path, example_shape=(1, *manifest.input_shape))
        return fn(path, "the QDQ export of the trained network (temporary; the run has none)")


def verify_qonnx_file(run_dir: Path, path: Path, x: torch.Tensor, inputs: str) -> dict:
    """:func:`check_qonnx` of ``path`` against the run's QDQ file and trained model on images ``x``:
    bit-exact for a po2 run, lossless-activations otherwise."""
    run = RunDir(run_dir)
    manifest, qat = run.load_qat()
    if manifest.act is None:
        raise UserInputError(f"{path.name} is a QONNX file; {run_dir} has no --act-bits network to check it against")
    return _with_qdq(run, manifest, qat, lambda qdq, source: check_qonnx(qat, path, qdq, x, po2=manifest.po2)
                     | {"inputs": inputs, "qdq_file": source})


def qonnx_file(path: Path) -> bool:
    """Whether ``path`` is a QONNX file (it holds ``Quant`` nodes)."""
    try:
        return is_qonnx(load_onnx(path, "qonnx", external_data=False))
    except Exception:
        return False


def golden_qonnx(run_dir: Path, path: Path, x: np.ndarray, out: Path, inputs: str) -> dict:
    """``golden --precision qonnx``: the QONNX file in qonnx's executor must hold the integer
    reference's integers at every point (the check of ``verify``; ParityError naming the first
    differing point otherwise); then the golden vectors are the integer reference's, written from
    the run's QDQ file. Hashes of the run's files are checked first."""
    run = RunDir(run_dir)
    run.check_artifacts(run.manifest())
    manifest, qat = run.load_qat()
    if manifest.act is None:
        raise UserInputError(f"{run_dir} has no --act-bits network: --precision qonnx does not apply")

    def both(qdq: Path, source: str) -> dict:
        res = check_qonnx(qat, path, qdq, torch.from_numpy(np.asarray(x, np.float32)), po2=manifest.po2)
        if not res["passed"]:
            raise ParityError(f"{path.name}: {res['failures'][0]}")
        summary = golden_for_file(qdq, x, Path(out), inputs)
        return summary | {"qonnx": {"file": str(path), "mode": res["mode"], "passed": True,
                                    "elements": res["elements"], "equal": res["equal"], "qdq_file": source}}
    return _with_qdq(run, manifest, qat, both)
