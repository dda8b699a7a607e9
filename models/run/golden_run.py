"""``wnconvert golden RUN``: golden vectors of a run's integer file on real images.

The run directory supplies what a hardware team should not have to repeat: the deployed file
(``model.int8.onnx`` by default), the preprocessing and the data. The integer reference
(:mod:`wnconvert.convert.intref`) computes every quantized tensor; :mod:`wnconvert.convert.golden`
writes them with their index."""

from __future__ import annotations

from pathlib import Path

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.golden import golden_for_file

from .precheck import GOLDEN_PRECISIONS, check_golden  # noqa: F401 (GOLDEN_PRECISIONS re-exported)
from .qonnx_run import golden_qonnx, qonnx_file
from .run_export import data_arrays
from .rundir import RunDir


def golden_for_run(run_dir: Path, out: Path, *, data: str | None = None, count: int = 8,
                   precision: str = "int8", onnx_file: Path | None = None) -> dict:
    """Write ``out/golden.npz`` and ``out/index.json`` for ``count`` validation images of ``data``
    (default: the run's) through the run's ``model.<precision>.onnx`` (or ``onnx_file``)."""
    path, spec = check_golden(run_dir, out, data, count, precision, onnx_file)
    run = RunDir(run_dir)
    manifest = run.manifest()
    x = data_arrays(spec, manifest.preprocess, count, "val", "--count")
    if len(x) < count:
        raise UserInputError(f"--count {count}: the validation set of {spec} has {len(x)} images")
    if precision == "tflite":
        from .tflite_golden import golden_tflite

        return golden_tflite(path, x, Path(out), f"{len(x)} validation images of {spec}") | {"tflite": str(path)}
    if precision == "qonnx" or qonnx_file(path):
        return golden_qonnx(run.path, path, x, Path(out), f"{len(x)} validation images of {spec}") | {"onnx": str(path)}
    summary = golden_for_file(path, x, Path(out), f"{len(x)} validation images of {spec}")
    return summary | {"onnx": str(path)}
