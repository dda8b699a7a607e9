"""``wnconvert export RUN --target ethos-u55-128`` (and the other Ethos-U targets): the run's int8
.tflite (``model.int8.tflite``, ``export --target tflite-micro``) compiled by Vela into
``model.int8.<target>.tflite`` beside it, Vela's figures in report.json (``ethos_u.<target>``)."""

from __future__ import annotations

from pathlib import Path

from wnconvert.convert.artifacts import atomic_path
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.ethosu import compile_tflite, require_vela

from .precheck import check_ethos_u_request
from .rundir import RunDir, writes_run

TFLITE = "model.int8.tflite"


def ethos_u_name(target: str) -> str:
    return f"model.int8.{target}.tflite"


@writes_run
def export_ethos_u(run_dir: Path, target: str, precision: str = "int8") -> dict:
    """Compile ``RUN/model.int8.tflite`` for ``target``; returns the report entry."""
    check_ethos_u_request(target, precision)
    require_vela()
    run = RunDir(run_dir)
    manifest = run.manifest()
    run.check_artifacts(manifest)   # the hashes first: the .tflite compiled is the one the run wrote
    src = run.path / TFLITE
    if not src.is_file():
        raise UserInputError(f"{run.path} has no {TFLITE}: write it first with "
                             f"`wnconvert export {run.path} --target tflite-micro`")
    dst = run.path / ethos_u_name(target)
    with atomic_path(dst) as tmp:
        entry = compile_tflite(src, target, tmp)
    entry["file"] = dst.name
    entry["source"] = TFLITE
    run.update_report(lambda report: report.setdefault("ethos_u", {}).__setitem__(target, entry))
    run.finish(manifest)
    return entry
