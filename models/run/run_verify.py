"""Checking a run directory's ONNX files against its checkpoint: ``wnconvert verify``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from wnconvert.convert.errors import ParityError, UserInputError
from wnconvert.convert.quant_check import QuantThresholds, check_lossy, detect_precision
from wnconvert.convert.quantize import PRECISIONS
from wnconvert.convert.quantize.container import container_record
from wnconvert.convert.reading import load_onnx
from wnconvert.convert.verify import VerifyConfig, load_inputs, make_inputs, verify

from ..files import artifact_name
from .act_files import CONTRACT, verify_act_file
from .bitexact_run import judged_bit_exact, verify_bitexact_file
from .precheck import verify_paths
from .qonnx_run import QONNX_FILE, qonnx_file, verify_qonnx_file
from .run_export import data_arrays
from .run_options import VerifyRequest  # noqa: F401 (re-exported)
from .rundir import REPORT, RunDir
from .tflite_verify import tflite_files, verify_tflite_file
from .verify_progress import VerifyProgress, stage


def verify_tflite(run: RunDir, manifest, paths: list[Path], req: VerifyRequest) -> dict:
    """Each .tflite under the tflite-one-step contract (models/run/tflite_verify.py), on ``--limit``
    images of the run's data (or ``--data``), generated inputs without any."""
    spec = req.data or (manifest.data if not req.inputs else None)
    if spec:
        x = data_arrays(spec, manifest.preprocess, req.limit)
        inputs = f"{len(x)} images from {spec}"
    else:
        x = (load_inputs(req.inputs, manifest.input_shape) if req.inputs else
             make_inputs(manifest.input_shape, req.config)).numpy()
        inputs = f"{len(x)} {'given' if req.inputs else 'generated'} inputs"
    return {p.name: verify_tflite_file(run.path, p, np.asarray(x, np.float32), inputs) for p in paths}


def quantized_artifacts(run_dir: Path) -> list[tuple[str, Path]]:
    """``(precision, path)`` of every ``model.<precision>.onnx`` present in the run."""
    return [(p, Path(run_dir) / artifact_name(p)) for p in PRECISIONS
            if p != "fp32" and (Path(run_dir) / artifact_name(p)).exists()] + (
        [("qonnx", Path(run_dir) / QONNX_FILE)] if (Path(run_dir) / QONNX_FILE).exists() else [])


def files_to_verify(run_dir: Path, onnx_file: Path | None, precision: str | None) -> list[tuple[str, Path]]:
    """``(precision, path)`` pairs ``verify`` checks: ``--onnx F`` alone (its precision read from
    the file), ``--precision P``'s file alone (``qonnx``: model.qonnx.onnx), or model.onnx and
    every low-precision file present (those alone when the run has no model.onnx)."""
    path = verify_paths(run_dir, onnx_file, precision)
    if onnx_file is not None:
        return [("qonnx" if qonnx_file(onnx_file) else detect_precision(onnx_file), onnx_file)]
    if path is None:  # no model.onnx: the run's low-precision files (and its .tflite, verify_tflite) alone
        return quantized_artifacts(run_dir)
    return [(precision or "fp32", path)] + (quantized_artifacts(run_dir) if precision is None else [])


def verify_quantized(run_dir: Path, model: nn.Module, files: list[tuple[str, Path]], x_parity: Tensor,
                     parity_cfg: VerifyConfig, x: np.ndarray, inputs: str,
                     thresholds: QuantThresholds, progress: VerifyProgress | None = None) -> dict:
    """Check each low-precision file under its contract (see ``convert/quant_check.py``): the
    deployed file of an ``--act-bits`` run bit-exact (power-of-two scales, models/run/bitexact_run.py)
    or lossless-activations (models/run/act_files.py); a lossless one (report.json says export found
    every weight on the run's trained grid) against the trained model at the fp32 tolerance; any
    other against ``model.onnx``."""
    run = RunDir(run_dir)
    made = run.report().get("quantized", {})
    manifest = run.manifest()
    out = {}
    for precision, path in files:
        if precision == "qonnx":  # model.qonnx.onnx: qonnx's executor against the QDQ file (models/run/qonnx_run.py)
            own = path.resolve() == (run.path / QONNX_FILE).resolve()
            res = verify_qonnx_file(run.path, path, torch.from_numpy(np.asarray(x, np.float32)), inputs)
            out["qonnx" if own else str(path)] = res | {"file": str(path)}
            continue
        own = path.resolve() == (run.path / artifact_name(precision)).resolve()
        entry = made.get(precision, {}) if own else {}
        what = f"{path.name} on {inputs}"
        if judged_bit_exact(manifest, entry):
            stage(progress, f"{what}, bit-exact contract (PyTorch, integer reference, onnxruntime off/on)")
            res = verify_bitexact_file(run.path, path, torch.from_numpy(np.asarray(x, np.float32)), inputs)
        elif entry.get("contract") == CONTRACT:
            stage(progress, f"{what}, lossless-activations contract, onnxruntime optimizations off")
            level_on = f"{what}, lossless-activations contract, onnxruntime optimizations on"
            res = verify_act_file(run.path, path, torch.from_numpy(np.asarray(x, np.float32)), inputs,
                                  progress=lambda k: stage(progress, level_on) if k == 1 else None)
        elif "lossless_check" in entry:
            rep = verify(model, x_parity, onnx_path=path, config=parity_cfg,
                         inputs_name=f"{len(x_parity)} samples")
            res = {"contract": "lossless", "parity": rep.to_dict(), "passed": rep.passed,
                   "failures": rep.failures()}
        else:
            stage(progress, f"{what}, {'lossless' if 'lossless_check' in entry else 'lossy'} contract")
            if not run.onnx_path.exists():
                raise UserInputError(f"{run_dir} has no model.onnx to compare {path.name} with")
            res = check_lossy(run.onnx_path, path, x, thresholds) | {"inputs": inputs}
        out[precision if own else str(path)] = with_container_check(res, path) | {"file": str(path)}
    return out


def with_container_check(res: dict, path: Path) -> dict:
    """``res`` with the check of the file's int8 containers (every weight in the 4-bit range of a
    file marked as such) recorded and its violations among the failures."""
    record = container_record(load_onnx(path, error=ParityError))  # under a contract: unreadable is 3
    if record["storage"] != "int8":
        return res
    bad = record["violations"]
    return res | {"container": record, "failures": list(res["failures"]) + bad, "passed": res["passed"] and not bad}


@dataclass
class VerifyOutcome:
    result: dict                        # written to report.json["verify"]
    checked_fp32: bool
    checked_quantized: bool
    failures: list[str]
    recorded: bool = True               # False: the run directory is read-only, report.json not updated

    @property
    def passed(self) -> bool:
        return not self.failures


def verify_run(run_dir: Path, req: VerifyRequest = VerifyRequest(),
               progress: VerifyProgress | None = None) -> VerifyOutcome:
    """Check every artifact recorded in the manifest against its sha256 (ParityError naming the
    file otherwise), then compare the run's ONNX files with its checkpoint (evaluated in float64)
    and each low-precision file under its contract; records the result in report.json (when the
    run has one and the directory is writable, under its write lock; report.json's new sha256 goes
    into the manifest) and returns it. The caller raises ParityError on failures, after showing them.
    ``progress`` (models/run/verify_progress.py) is told each stage."""
    run = RunDir(run_dir)
    if run.path.is_dir() and run.writable():
        with run.writing():
            return _verify_run(run, req, write=True, progress=progress)
    return _verify_run(run, req, write=False, progress=progress)


def _verify_run(run: RunDir, req: VerifyRequest, write: bool, progress: VerifyProgress | None = None) -> VerifyOutcome:
    stage(progress, "checking the artifacts' sha256")
    run.check_artifacts(run.manifest())
    manifest, model, _ = run.load()
    if req.tflite is not None and (req.onnx_file is not None or req.precision is not None):
        raise UserInputError("give --tflite alone, without --onnx or --precision")
    tflite = tflite_files(run.path, req.tflite) if req.onnx_file is None and req.precision is None else []
    files = [] if req.tflite is not None else files_to_verify(run.path, req.onnx_file, req.precision)
    cfg = req.config
    shape = manifest.input_shape
    x = load_inputs(req.inputs, shape) if req.inputs else make_inputs(shape, cfg)
    inputs_name = str(req.inputs) if req.inputs else f"{len(x)} generated samples, seed {cfg.seed}"
    d: dict = {}
    failures: list[str] = []
    fp32 = [p for prec, p in files if prec == "fp32"]
    if fp32:
        stage(progress, f"{fp32[0].name} against the checkpoint in float64 ({inputs_name})")
        report = verify(model, x, onnx_path=fp32[0], config=cfg, inputs_name=inputs_name)
        d = report.to_dict()
        failures = report.failures()
    low = [(prec, p) for prec, p in files if prec != "fp32"]
    if low:
        spec = req.data or (manifest.data if not req.inputs else None)
        if spec:
            xq = data_arrays(spec, manifest.preprocess, req.limit)
            q_inputs = f"{len(xq)} images from {spec}"
        else:
            xq, q_inputs = x.numpy(), inputs_name
        d["quantized"] = verify_quantized(run.path, model, low, x, cfg, xq, q_inputs, req.thresholds, progress)
        for name, res in d["quantized"].items():
            failures += [f"{name}: {f}" for f in res["failures"]]
        d["passed"] = not failures
    if tflite:
        d["tflite"] = verify_tflite(run, manifest, tflite, req)
        for name, res in d["tflite"].items():
            failures += [f"{name}: {f}" for f in res["failures"]]
        d["passed"] = not failures
    recorded = write or not run.report_path.exists()
    if write and run.report_path.exists():
        run.update_report({"verify": d})
        if manifest.status == "complete":
            run.record(manifest, REPORT)
    return VerifyOutcome(d, bool(fp32), bool(low), failures, recorded)
