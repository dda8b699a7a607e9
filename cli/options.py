"""Choices and defaults of the command-line options, taken from the library.

Every choice option is typed with an enum built from the registry it comes from, so ``--help``
lists the values and the parser rejects any other; defaults are read from the dataclass fields,
so the CLI cannot drift from the library. Both come from light modules (convert/names.py,
convert/configs.py, models/train/optim_settings.py, models/run/run_options.py, models/train/train_config.py) that
load no torch, onnx or numpy: ``--help`` and parser errors stay fast."""

from __future__ import annotations

import dataclasses
import re
from enum import Enum

import typer

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.names import (
    ACT_TYPES,
    BN_MODES,
    CALIBRATORS,
    CONTAINERS,
    ETHOS_U_TARGETS,
    GAIN_MODES,
    GRANULARITIES,
    PRECISIONS,
    PROVIDERS,
    RANGE_MODES,
    ROUNDINGS,
    RUNTIMES,
    SCALE_FORMATS,
    SCALE_GRAD_MODES,
    SCHEME_NAMES,
    TARGETS,
    TFLITE_RUNTIMES,
    TRAIN_PLACEMENTS,
    VERIFY_PRECISIONS,
    WEIGHT_RANGES,
)
from wnconvert.models.run.run_options import CALIB_SPLITS
from wnconvert.models.train.optim_settings import OPTIMIZERS, SCHEDULES, WD_MODES


def choices(name: str, values) -> type[Enum]:
    """A str enum whose members are ``values`` (names and values alike)."""
    return Enum(name, {v: v for v in values}, type=str)


_REGISTRIES = {"Scheme": SCHEME_NAMES, "Gain": GAIN_MODES, "ScaleGrad": SCALE_GRAD_MODES, "Bn": BN_MODES,
               "Granularity": GRANULARITIES, "Optimizer": OPTIMIZERS, "WdMode": WD_MODES,
               "Schedule": SCHEDULES, "Precision": PRECISIONS, "Calibrator": CALIBRATORS,
               "ActType": ACT_TYPES, "CalibSplit": CALIB_SPLITS, "Provider": PROVIDERS, "ActRange": RANGE_MODES,
               "ScaleFormat": SCALE_FORMATS, "Runtime": RUNTIMES + TFLITE_RUNTIMES, "Target": TARGETS + ETHOS_U_TARGETS,
               "Container": CONTAINERS, "TrainTarget": TRAIN_PLACEMENTS, "Rounding": ROUNDINGS}
(Scheme, Gain, ScaleGrad, Bn, Granularity, Optimizer, WdMode, Schedule, Precision, Calibrator, ActType,
 CalibSplit, Provider, ActRange, ScaleFormat, Runtime, Target, Container,
 TrainTarget, Rounding) = (choices(name, values) for name, values in _REGISTRIES.items())
WeightRange = choices("WeightRange", WEIGHT_RANGES)
VerifyPrecision = choices("VerifyPrecision", VERIFY_PRECISIONS)


def value(choice):
    """The plain string of an enum option (None stays None)."""
    return choice.value if isinstance(choice, Enum) else choice


def default(cls, name: str):
    """The default of dataclass ``cls``'s field ``name``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


# what the library's own checks call these options
_LABELS = {"gain": "gain mode", "scale_grad": "scale-grad mode", "bn": "--bn mode",
           "act_type": "activation type", "calibrate_method": "calibration method"}
_NOT_ONE_OF = re.compile(r"'(?P<value>[^']*)' is not one of (?P<choices>.*?)\.?$", re.S)


def usage_message(param_name: str | None, message: str) -> str:
    """A parser error in the wording of the library's own checks: ``unknown scheme 'x'; choose
    one of: a, b`` for a value outside a choice option's enum."""
    m = _NOT_ONE_OF.search(message.strip())
    if m and param_name:
        names = ", ".join(c.strip().strip("'") for c in m["choices"].split(","))
        label = _LABELS.get(param_name, param_name.replace("_", " "))
        return f"unknown {label} {m['value']!r}; choose one of: {names}"
    if param_name and not message.startswith(("-", "Invalid value", "Missing")):
        return f"--{param_name.replace('_', '-')}: {message}"  # which option the parser refused
    return message


def given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (or through its environment variable)."""
    return getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")


def refuse_with_resume(ctx: typer.Context, allowed: set[str]) -> None:
    """``--resume`` continues a run with the settings it recorded: any other option given on the
    command line (or through its environment variable) would be ignored, so it is refused."""
    given = [p.opts[0] for p in ctx.command.params if p.name not in allowed and
             getattr(ctx.get_parameter_source(p.name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")]
    if given:
        raise UserInputError(f"--resume continues the run with its recorded settings; {', '.join(given)} "
                             "would be ignored: drop them (or start a new run)")
