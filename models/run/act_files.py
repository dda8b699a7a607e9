"""The deployed files of an ``--act-bits`` run: ``export --precision int8|int4`` writes the QAT
model as QDQ ONNX with its trained scales (no calibration, no data; the ``trained`` format of
``convert/quantize``) and ``verify`` checks it under the **lossless-activations** contract
(``convert/actquant/lossless.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from wnconvert.convert.actquant import act_points, check_lossless_activations, qlayers
from wnconvert.convert.quantize import QuantOptions, QuantResult, TrainedNetwork
from wnconvert.convert.verify import VerifyConfig, make_inputs

from ..data.data import eval_arrays
from .precheck import WEIGHT_BITS, check_act_values  # noqa: F401 (WEIGHT_BITS re-exported)
from .rundir import Manifest, RunDir

CONTRACT = "lossless-activations"


def check_act_precision(manifest: Manifest, precision: str, act_bits: str | None, data: str | None) -> None:
    """Refuse an export that does not match what the run trained (one line, exit 2; .precheck)."""
    check_act_values(manifest.scheme.weight_bits, manifest.act.bits, precision, act_bits, data)


def trained_source(run: RunDir, precision: str, act_bits: str | None, data: str | None,
                   container: str = "int4") -> tuple[TrainedNetwork, QuantOptions]:
    """The run's QAT model as the source of its ``precision`` file (its trained scales; 4-bit values
    stored in ``container``: int4 | int8), after the refusals the manifest decides."""
    check_act_precision(run.manifest(), precision, act_bits, data)
    manifest, qat = run.load_qat()
    return (TrainedNetwork(qat, (1, *manifest.input_shape)),
            QuantOptions(precision=precision, act_bits=None, scales="trained", container=container))


def trained_entry(manifest: Manifest, source: TrainedNetwork, result: QuantResult) -> dict:
    """report.json's ``quantized[precision]`` entry of a file written from ``source``."""
    qat = source.model
    entry = {"file": result.path.name, "contract": CONTRACT, "precision": result.precision,
             "weight_bits": int(qlayers(qat)[0].weight_bits), "act_bits": manifest.act.bits,
             "calibration": None, "scales": "trained", "scale_format": manifest.act.scale_format,
             "mixed_precision": manifest.act.mixed_precision, "float_ops": float_ops(qat),
             "residual_conv": manifest.act.residual_conv} | result.trained.to_dict()
    entry["path"] = result.path.name  # relative, like "file"
    if result.shifts is not None:
        entry["shifts"] = result.shifts  # per layer: input/weight/output scale exponents and the shift n
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


def verify_act_file(run_dir: Path, path: Path, x: torch.Tensor, inputs: str,
                    progress: Callable[[int], None] | None = None) -> dict:
    """``check_lossless_activations`` of ``path`` against the run's QAT model, with per-point
    counts of elements at rounding ties (``ties``) for report.json."""
    _, qat = RunDir(run_dir).load_qat()
    res = check_lossless_activations(qat, path, x, progress=progress)
    ties = {level: {p: st.get("at_ties", 0) for p, st in d["points"].items()}
            for level, d in res["levels"].items()}
    return {"contract": CONTRACT, "inputs": inputs, "passed": res["passed"], "failures": res["failures"],
            "ties": ties, "classifier": res["classifier"], "levels": res["levels"]}
