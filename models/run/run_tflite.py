"""``wnconvert export RUN --target tflite-micro``: the run's int8 network as ``RUN/model.int8.tflite``
for TensorFlow Lite Micro.

The integers come from the run's int8 QDQ network, made in memory exactly as ``export --precision
int8`` makes ``model.int8.onnx``: an ``--act-bits 8`` run's trained scales (no calibration), or an
fp32 run calibrated on its own data with the target's settings (int8 activations, per-channel
symmetric weights, int32 biases). :mod:`wnconvert.convert.tflite.writer` translates that network
operator by operator; nothing is written when an operator has no TFLite Micro counterpart.
``verify`` (:mod:`.tflite_verify`) makes the same QDQ network again to compare with.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from wnconvert.convert.artifacts import atomic_path
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.quantize import QuantOptions, quantize
from wnconvert.convert.tflite.flatbuf import to_bytes
from wnconvert.convert.tflite.logits import quantize_logits
from wnconvert.convert.tflite.writer import IO_MODES, Writer

from ..files import TFLITE, artifact_name
from .precheck import check_tflite_act, check_tflite_calibration
from .run_export import _calibration
from .run_options import PrecisionOptions
from .rundir import Manifest, RunDir, writes_run

TFLITE_FILE = TFLITE
TARGET = "tflite-micro"
RUNTIME = "TensorFlow Lite Micro (int8 .tflite)"


def check_tflite_run(manifest: Manifest) -> None:
    """Refuse, in one line and before anything is written, a run this target cannot take (.precheck)."""
    act = manifest.act
    if act is not None:
        check_tflite_act(manifest.scheme.weight_bits, act.bits, act.mixed_precision, act.residual_conv)


def tflite_options(manifest: Manifest, opts: PrecisionOptions) -> QuantOptions:
    """The quantizer's settings for an fp32 run: TFLite's int8 scheme."""
    check_tflite_calibration(opts)
    return QuantOptions(precision="int8", act_bits=8, per_channel=True, calibrate_method=opts.calibrate_method,
                        grid_bits=manifest.scheme.weight_bits, act_type="int8", fuse=opts.fuse,
                        act_symmetric=False, quantize_bias=True)


def _trained_file(run: RunDir) -> Path | None:
    """The run's own model.int8.onnx when it is the trained network (an --act-bits run's export):
    the same QDQ network :func:`source_network` would make, without making it again."""
    entry = run.report().get("quantized", {}).get("int8", {}) if run.report_path.exists() else {}
    path = run.path / artifact_name("int8")
    return path if path.is_file() and entry.get("scales") == "trained" and entry.get("file") == path.name else None


def source_network(run: RunDir, opts: PrecisionOptions) -> tuple[onnx.ModelProto, dict]:
    """The run's int8 QDQ network (in memory) and how it was made (report.json's record)."""
    manifest = run.manifest()
    check_tflite_run(manifest)
    with tempfile.TemporaryDirectory(prefix="wnconvert-tflite-") as tmp:
        path = Path(tmp) / "source.int8.onnx"
        if manifest.act is not None:
            if opts.data:
                raise UserInputError("an --act-bits run exports its trained activation scales; it takes no "
                                     "calibration --data")
            info = {"scales": "trained", "calibration": None, "act_bits": 8,
                    "scale_format": manifest.act.scale_format}
            own = _trained_file(run)
            if own is not None:
                return onnx.load(str(own)), info | {"from": own.name}
            from wnconvert.convert.actquant import export_qdq

            _, qat = run.load_qat()
            export_qdq(qat, path, example_shape=(1, *manifest.input_shape))
        else:
            options = tflite_options(manifest, opts)
            if not run.onnx_path.exists():
                raise UserInputError(f"{run.path} has no model.onnx; run `wnconvert export {run.path}` first")
            calib, _, calibration = _calibration(manifest, "int8", options, opts)
            quantize(run.onnx_path, path, options, calib)
            quantize_logits(path, calib)
            info = {"scales": "calibrated", "calibration": calibration, "calibrate_method": opts.calibrate_method,
                    "calib_samples": opts.calib_samples, "calib_split": opts.calib_split, "data": opts.data}
        return onnx.load(str(path)), info


@writes_run
def export_tflite(run_dir: Path, opts: PrecisionOptions = PrecisionOptions(), io: str = "int8") -> dict:
    """Write ``RUN_DIR/model.int8.tflite`` (see the module docstring); returns the entry recorded
    in report.json (``tflite``) and the manifest's settings (``targets``)."""
    if io not in IO_MODES:
        raise UserInputError(f"--io must be one of {', '.join(IO_MODES)}, not {io!r}")
    run = RunDir(run_dir)
    manifest = run.manifest()
    source, info = source_network(run, opts)
    writer = Writer(source, io)
    model = writer.translate()  # refuses an operator before anything is written
    data = to_bytes(model)
    dst = run.path / TFLITE_FILE
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)
    ops: dict[str, int] = {}
    for op in model.ops:
        ops[op.op] = ops.get(op.op, 0) + 1
    entry = {"file": TFLITE_FILE, "target": TARGET, "runtime": RUNTIME, "io": io, "bytes": len(data),
             "operators": ops, "tensors": len(model.tensors),
             "input": _tensor_record(model, model.inputs[0]), "output": _tensor_record(model, model.outputs[0]),
             "dense_grouped_convs": writer.expanded} | info
    run.update_report(lambda report: report.__setitem__("tflite", entry))
    manifest.targets[TFLITE_FILE] = {"target": TARGET, "overridden": [], "io": io,
                                     "options": _recorded_options(opts, info)}
    run.finish(manifest)
    return entry


def _tensor_record(model, index: int) -> dict:
    t = model.tensors[index]
    rec = {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}
    if t.quantized:
        rec |= {"scale": float(t.scale[0]), "zero_point": int(t.zero_point[0])}
    return rec


def _recorded_options(opts: PrecisionOptions, info: dict) -> dict:
    """What verify needs to make the same QDQ network again (an fp32 run's calibration)."""
    if info["scales"] == "trained":
        return {}
    return {"data": opts.data, "calib_samples": opts.calib_samples, "calib_split": opts.calib_split,
            "calibrate_method": opts.calibrate_method, "fuse": opts.fuse}


def recorded_options(manifest: Manifest) -> tuple[PrecisionOptions, str]:
    """The options and ``--io`` the run's .tflite was exported with."""
    rec = manifest.targets.get(TFLITE_FILE) or {}
    return PrecisionOptions(**(rec.get("options") or {})), rec.get("io", "int8")
