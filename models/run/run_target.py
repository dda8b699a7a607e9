"""``export RUN --target T``: which files a run can give a deployment target, the target's settings
with the explicit options over them, the structural check of the file before it is put in place
(:func:`rules_guard`: a file that breaks the rules never replaces the previous one) and the record
of target and check (report.json ``targets``, the manifest's ``targets``)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from wnconvert.convert.errors import ParityError, UserInputError
from wnconvert.convert.quantize.target_rules import check_file
from wnconvert.convert.quantize.targets import (TargetPreset, apply_target, check_target_precision,
                                                get_target, target_record)

from .rundir import Manifest, RunDir

TRAINED = {"scales": "trained"}  # the settings of an --act-bits run's file: its own
# An --act-bits file keeps the trained network's Q/DQ pairs, placed as `finetune --target` said
# (convert/quantize/placement.py); a target placing them otherwise gets the file with a note.
PLACEMENT_NOTES = {
    ("quantized", "float"): "OpenVINO fuses each residual Add into the Conv before it and skips the "
    "requantization the trained network has between them: this file is the trained network bit for bit "
    "in onnxruntime (verify's lossless-activations), not in OpenVINO; train with finetune --target openvino",
    ("float", "quantized"): "the run was trained for OpenVINO's placement (finetune --target openvino): the "
    "Convs before its residual Adds stay float, and onnxruntime runs them in float, not in its integer kernels",
}


def check_run_target(manifest: Manifest, preset: TargetPreset, precision: str, weights_only: bool) -> None:
    """Refuse, in one line and before anything is written, a file the target cannot take from this run."""
    act_file = manifest.act is not None and precision != "fp16"
    if preset.act_runs == "po2" and not manifest.po2:
        how = "without --act-bits" if manifest.act is None else "with float activation scales"
        raise UserInputError(f"--target {preset.name} needs a run trained with power-of-two activation "
                             f"scales (finetune --act-bits A --weight-bits B --scale-format po2); this run was trained {how}")
    check_target_precision(preset, precision, weights_only and not act_file)
    if act_file and preset.act_runs == "refused":
        raise UserInputError(f"--target {preset.name}: an --act-bits run's file keeps its trained "
                             "integers (unsigned activations, int32 biases), which this target does not "
                             "take; export it with --target ort-cpu or openvino")


def resolve_target(name: str, overrides: dict) -> tuple[TargetPreset, dict, list[str]]:
    """The preset, its settings with the non-None ``overrides`` over them, and the overridden names."""
    preset = get_target(name)
    settings, overridden = apply_target(preset, overrides)
    return preset, settings, overridden


def record_target(run: RunDir, manifest: Manifest, path: Path, preset: TargetPreset, settings: dict,
                  overridden: list[str], trained: str | None = None) -> dict:
    """Check ``path`` against the target's rules and record target and check in report.json and in
    ``manifest`` (the caller writes it). Returns the report's record. ``trained``: the placement
    (``residual_conv``) an --act-bits run's file was trained with, noted where the target's differs."""
    record = target_record(preset, settings, overridden) | {"check": check_file(path, preset.rules)}
    note = PLACEMENT_NOTES.get((trained, preset.residual_conv))
    if note:
        record["note"] = note
    run.update_report(lambda report: report.setdefault("targets", {}).__setitem__(path.name, record))
    manifest.targets[path.name] = {"target": preset.name, "overridden": overridden}
    return record


def rules_guard(preset: TargetPreset, name: str) -> Callable[[Path], None]:
    """A check of a file about to become ``name`` (run on the temporary file, before it is put in
    place): ParityError (exit 3) naming the first rule of ``preset`` it breaks, or the first weight
    of an int8-container file outside its 4-bit range (any target)."""
    def check(path: Path) -> None:
        found = check_file(path, preset.rules)["violations"]
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise ParityError(f"{name} breaks the {preset.name} rules: {found[0]}{more}; "
                              "nothing was written")
    return check
