"""``wnconvert export RUN --target ethos-u55-128`` (and the other Ethos-U targets): the run's int8
.tflite (``model.int8.tflite``, ``export --target tflite-micro``) compiled by Vela into
``model.int8.<target>.tflite`` beside it, Vela's figures in report.json (``ethos_u.<target>``)."""

from __future__ import annotations

from pathlib import Path

from wnconvert.convert.artifacts import atomic_path
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.ethosu import compile_tflite, require_vela
from wnconvert.convert.names import ETHOS_U_TARGETS

from .rundir import RunDir, writes_run

TFLITE = "model.int8.tflite"


def ethos_u_name(target: str) -> str:
    return f"model.int8.{target}.tflite"


def check_ethos_u_request(target: str, precision: str) -> None:
    if target not in ETHOS_U_TARGETS:
        raise UserInputError(f"unknown Ethos-U target {target!r}; choose one of: {', '.join(ETHOS_U_TARGETS)}")
    if precision not in ("fp32", "int8"):  # fp32 is export's default: the option left out
        raise UserInputError(f"--target {target} compiles the run's int8 .tflite; --precision {precision} is refused"
                             + (" (Vela crashes on INT4 weights)" if precision == "int4" else ""))


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
