"""wnconvert as a library: your own network and training loop, a verified deployed file.

Five calls take a network you wrote to a verified W8A8 ONNX file (docs/api.md)::

    import wnconvert
    cfg = wnconvert.QATConfig(weight_bits=8, act_bits=8)
    qmodel = wnconvert.prepare(model, cfg)          # a copy: weights on their grid, activation fake-quant
    wnconvert.calibrate(qmodel, batches)            # activation ranges from a few of your batches
    ...                                             # your training loop on qmodel
    wnconvert.freeze_bn(qmodel)                     # before the last epoch (optional)
    wnconvert.export(qmodel, "model.int8.onnx", example_input=x)
    report = wnconvert.verify(qmodel, "model.int8.onnx", inputs=x)
    assert report.passed

The names are loaded on first use: ``import wnconvert`` loads no torch, onnx or numpy (the
command line's start-up depends on it; tests/test_api.py checks it)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module defining it (imported on first access)
_LAZY = {
    "QATConfig": "wnconvert.qat_config",
    "prepare": "wnconvert.api", "calibrate": "wnconvert.api", "freeze_bn": "wnconvert.api",
    "export": "wnconvert.api", "verify": "wnconvert.api", "VerifyReport": "wnconvert.api",
    "ExportReport": "wnconvert.api",
    "apply_scheme": "wnconvert.convert.apply", "fold": "wnconvert.api",
    "SchemeConfig": "wnconvert.convert.configs", "FoldConfig": "wnconvert.convert.configs",
    "UserInputError": "wnconvert.convert.errors",
}

__all__ = ["__version__", "QATConfig", "prepare", "calibrate", "freeze_bn", "export", "verify", "VerifyReport",
           "ExportReport", "apply_scheme", "fold", "SchemeConfig", "FoldConfig", "UserInputError"]

if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from wnconvert.api import ExportReport, VerifyReport, calibrate, export, fold, freeze_bn, prepare, verify
    from wnconvert.convert.apply import apply_scheme
    from wnconvert.convert.configs import FoldConfig, SchemeConfig
    from wnconvert.convert.errors import UserInputError
    from wnconvert.qat_config import QATConfig

    __version__: str


def _version() -> str:
    """The installed distribution's version (pyproject.toml is its one source)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wnconvert")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        value = _version()
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'wnconvert' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
