"""Option defaults for ``wnconvert finetune --config FILE``: a TOML file or an earlier run's manifest.

A TOML file names options the way the command line does, with ``-`` or ``_``, at top level or in
the tables ``[scheme]``, ``[fold]``, ``[verify]`` and ``[train]`` (which are only grouping)::

    model = "resnet18"
    data = "fashion-mnist"
    scheme = "channel-max"
    weight-bits = 4

    [train]
    epochs = 8
    optimizer = "sgd"
    lr = 0.05

A ``manifest.json`` repeats (or, with flags, varies) the run that wrote it: its model, weights,
data, image size, scheme, fold, parity and training settings, and the activation quantization
of an --act-bits run (its ``act`` record as ``--act-bits``, ``--act-range``, ``--freeze-bn-epochs``,
``--scale-format``, ``--mixed-precision`` and ``--target``). Records that are not settings
(status, versions, artifacts, hashes) and the run directory itself are not taken. The caller
checks the keys against the command's options, so a misspelt key is an error, not a no-op.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.names import TRAIN_PLACEMENTS
from wnconvert.convert.reading import read_json, read_toml

from ..files import MANIFEST
from .manifest_version import check_manifest_version

SECTIONS = ("scheme", "fold", "verify", "train")
# Manifest entries that record a run rather than configure one.
_MANIFEST_RECORDS = {"status", "created", "versions", "artifacts", "input", "output", "export",
                     "preprocess", "schema_version", "version"}


def _key(name: str) -> str:
    return name.replace("-", "_")


def _act_options(act: dict) -> dict[str, Any]:
    """A manifest's ``act`` record (models/train/act_run.ActSettings) as finetune's options."""
    out = {"act_bits": act.get("bits"), "act_range": act.get("range"), "freeze_bn_epochs": act.get("freeze_bn_epochs"),
           "scale_format": act.get("scale_format"), "mixed_precision": act.get("mixed_precision"),
           "target": {placement: t for t, placement in TRAIN_PLACEMENTS.items()}.get(act.get("residual_conv")),
           "rounding": act.get("rounding")}
    return {k: v for k, v in out.items() if v is not None}


def _flatten(table: dict, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in SECTIONS and isinstance(value, dict):
            inner = _flatten(value, f"{where} [{key}]")
            clash = set(inner) & set(out)
            if clash:
                raise UserInputError(f"{where}: {sorted(clash)[0]} is set twice")
            out.update(inner)
        elif isinstance(value, dict):
            raise UserInputError(f"{where}: [{key}] is not a section (sections: {', '.join(SECTIONS)})")
        else:
            if _key(key) in out:
                raise UserInputError(f"{where}: {key} is set twice")
            out[_key(key)] = value
    return out


def _from_manifest(manifest: dict, path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in manifest.items():
        if key in _MANIFEST_RECORDS or value is None:
            continue
        if key in SECTIONS or key == "act":
            if not isinstance(value, dict):
                raise UserInputError(f"{path}: {key} is not an object")
            out.update(_act_options(value) if key == "act" else {_key(k): v for k, v in value.items() if v is not None})
        else:
            out[_key(key)] = value
    size = (manifest.get("preprocess") or {}).get("image_size")
    if size is not None:
        out["image_size"] = size
    return out


def read_defaults(path: Path, known: set[str], never: set[str]) -> dict[str, Any]:
    """``{option name (underscores): value}`` from a TOML file or a run's manifest.json (or a run
    directory holding one). ``known`` are the command's option names; ``never`` those a config may
    not set (the run directory, --resume, --overwrite). A TOML key outside ``known`` is an error; a
    manifest's settings that are not options of the command (it records every field) are left out."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if path.suffix == ".json":
        data = read_json(path, "config")  # regular file, at most LIMITS["config"] bytes (reading.py)
        if not isinstance(data, dict):
            raise UserInputError(f"{path} is not a JSON object")
        check_manifest_version(data, str(path))  # the rule verify, export, eval and --resume apply
        return {k: v for k, v in _from_manifest(data, path).items() if k in known and k not in never}
    data = read_toml(path, "config")
    defaults = _flatten(data, str(path))
    for key in defaults:
        if key in never:
            raise UserInputError(f"{path}: {key} cannot be set from a config file; give it on the command line")
        if key not in known:
            raise UserInputError(f"{path}: unknown option {key!r}")
    return defaults
