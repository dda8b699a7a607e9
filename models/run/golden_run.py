"""``wnconvert golden RUN``: golden vectors of a run's integer file on real images.

The run directory supplies what a hardware team should not have to repeat: the deployed file
(``model.int8.onnx`` by default), the preprocessing and the data. The integer reference
(:mod:`wnconvert.convert.intref`) computes every quantized tensor; :mod:`wnconvert.convert.golden`
writes them with their index."""

from __future__ import annotations

from pathlib import Path

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.golden import golden_for_file

from ..files import TFLITE, artifact_name
from .run_export import data_arrays
from .rundir import RunDir

GOLDEN_PRECISIONS = ("int8", "int4", "tflite")


def golden_for_run(run_dir: Path, out: Path, *, data: str | None = None, count: int = 8,
                   precision: str = "int8", onnx_file: Path | None = None) -> dict:
    """Write ``out/golden.npz`` and ``out/index.json`` for ``count`` validation images of ``data``
    (default: the run's) through the run's ``model.<precision>.onnx`` (or ``onnx_file``)."""
    if count < 1:
        raise UserInputError("--count must be at least 1")
    if precision not in GOLDEN_PRECISIONS:
        raise UserInputError(f"--precision must be one of {', '.join(GOLDEN_PRECISIONS)}, not {precision!r}")
    run = RunDir(run_dir)
    manifest = run.manifest()
    own = run.path / (TFLITE if precision == "tflite" else artifact_name(precision))
    path = Path(onnx_file) if onnx_file is not None else own
    if not path.is_file():
        how = "--target tflite-micro" if precision == "tflite" else f"--precision {precision}"
        hint = "" if onnx_file is not None else f"; run `wnconvert export {run_dir} {how}` first"
        raise UserInputError(f"{path} does not exist{hint}")
    spec = data or manifest.data
    if not spec:
        raise UserInputError(f"{run_dir} was made without --data: give the images with --data SPEC")
    if Path(out).resolve() == run.path.resolve():
        raise UserInputError("--out must be a folder of its own, not the run directory")
    x = data_arrays(spec, manifest.preprocess, count, "val", "--count")
    if precision == "tflite":
        from .tflite_golden import golden_tflite

        return golden_tflite(path, x, Path(out), f"{len(x)} validation images of {spec}") | {"tflite": str(path)}
    summary = golden_for_file(path, x, Path(out), f"{len(x)} validation images of {spec}")
    return summary | {"onnx": str(path)}
