"""The deployed files of an ``--act-bits`` run: ``export --precision int8|int4`` writes the QAT
model as QDQ ONNX with its trained scales (no calibration, no data) and ``verify`` checks it under
the **lossless-activations** contract (``convert/actquant/lossless.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from wnconvert.convert.actquant import act_points, check_lossless_activations, export_qdq, qlayers
from wnconvert.convert.actquant.shifts import layer_shifts
from wnconvert.convert.errors import ParityError, UserInputError
from wnconvert.convert.artifacts import atomic_path
from wnconvert.convert.quantize.target_rules import fixed_point_violations
from wnconvert.convert.verify import VerifyConfig, make_inputs

from ..data.data import eval_arrays
from ..files import artifact_name
from .rundir import Manifest, RunDir

CONTRACT = "lossless-activations"
# weight storage of each deployed precision: int8 holds 5..8-bit grids, int4 the 2..4-bit ones
WEIGHT_BITS = {"int8": range(5, 9), "int4": range(2, 5)}


def check_act_precision(manifest: Manifest, precision: str, act_bits: str | None, data: str | None) -> None:
    """Refuse an export that does not match what the run trained (one line, exit 2)."""
    act, wbits = manifest.act, manifest.scheme.weight_bits
    if precision not in WEIGHT_BITS:
        raise UserInputError(f"an --act-bits run exports its trained network at int8 or int4, not {precision}")
    if wbits not in WEIGHT_BITS[precision]:
        want = "int4" if wbits <= 4 else "int8"
        raise UserInputError(f"this run trained {wbits}-bit weights: export it with --precision {want}, "
                             f"not {precision}")
    if act_bits is not None and act_bits.strip().lower() not in (str(act.bits), f"int{act.bits}"):
        raise UserInputError(f"this run trained {act.bits}-bit activations; --act-bits {act_bits} "
                             "does not match (leave it out)")
    if data:
        raise UserInputError("an --act-bits run exports its trained activation scales; it takes no "
                             "calibration --data")


def export_act_precision(run_dir: Path, precision: str, act_bits: str | None = None,
                         data: str | None = None, container: str = "int4",
                         check: Callable[[Path], None] | None = None) -> dict:
    """Write ``model.<precision>.onnx`` of an ``--act-bits`` run with its trained scales, its
    4-bit values (if any) in ``container`` (int4 | int8); returns the entry written to
    ``report.json["quantized"][precision]``. ``check`` (e.g. a target's rules) runs on the
    temporary file and raises to keep it from being put in place."""
    run = RunDir(run_dir)
    check_act_precision(run.manifest(), precision, act_bits, data)
    manifest, qat = run.load_qat()
    dst = run.path / artifact_name(precision)
    po2 = manifest.po2
    shifts = layer_shifts(qat) if po2 else None  # raises before anything is written
    with atomic_path(dst) as tmp:  # a po2 file is in place only once its scales are checked
        info = export_qdq(qat, tmp, example_shape=(1, *manifest.input_shape),  # opset 17, 21 with INT4
                          container=container)
        bad = fixed_point_violations(onnx.load(str(tmp))) if po2 else []
        if bad:
            raise ParityError(f"{dst.name} of a po2 run: {bad[0]}")
        if check is not None:
            check(tmp)
    entry = {"file": dst.name, "contract": CONTRACT, "precision": precision,
             "weight_bits": int(qlayers(qat)[0].weight_bits), "act_bits": manifest.act.bits,
             "calibration": None, "scales": "trained", "scale_format": manifest.act.scale_format,
             "mixed_precision": manifest.act.mixed_precision, "float_ops": float_ops(qat),
             "residual_conv": manifest.act.residual_conv} | info.to_dict()
    entry["path"] = dst.name  # relative, like "file"
    if shifts is not None:
        entry["shifts"] = shifts  # per layer: input/weight/output scale exponents and the shift n
    run.update_report(lambda report: report.setdefault("quantized", {}).__setitem__(precision, entry))
    run.finish(manifest)
    return entry


def float_ops(qat) -> dict[str, str]:
    """Point -> the operation kept in float before it (mixed precision; empty for an integer-only graph)."""
    return {p.name: p.op for p in act_points(qat) if p.kind == "float"}


def act_inputs(manifest: Manifest, data: str | None, limit: int, config: VerifyConfig) -> tuple[torch.Tensor, str]:
    """Images of ``data`` (default the run's data; validation split) or generated inputs."""
    spec = data or manifest.data
    if spec:
        images, _ = eval_arrays(spec, manifest.preprocess, limit=limit, split="val")
        return torch.from_numpy(np.ascontiguousarray(images, np.float32)), f"{len(images)} images from {spec}"
    x = make_inputs(manifest.input_shape, config).float()
    return x, f"{len(x)} generated samples, seed {config.seed}"


def verify_act_file(run_dir: Path, path: Path, x: torch.Tensor, inputs: str) -> dict:
    """``check_lossless_activations`` of ``path`` against the run's QAT model, with per-point
    counts of elements at rounding ties (``ties``) for report.json."""
    _, qat = RunDir(run_dir).load_qat()
    res = check_lossless_activations(qat, path, x)
    ties = {level: {p: st.get("at_ties", 0) for p, st in d["points"].items()}
            for level, d in res["levels"].items()}
    return {"contract": CONTRACT, "inputs": inputs, "passed": res["passed"],
            "failures": res["failures"], "ties": ties, "levels": res["levels"]}
