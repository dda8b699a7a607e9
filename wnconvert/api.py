"""The library's front door: a network of your own, trained by your own loop, to a verified file.

Each function is a thin layer over the pieces ``wnconvert finetune`` and ``wnconvert export`` run
on (``convert/apply.py``, ``convert/actquant``, ``convert/fold.py``), so a network prepared here is
the one a run trains and the file :func:`export` writes is the one ``export --precision`` writes
(tests/test_api.py compares them byte for byte). See docs/api.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from wnconvert.convert.actquant import (
    ActQuantConfig,
    act_config,
    check_bit_exact,
    check_lossless_activations,
    prepare_qat,
)
from wnconvert.convert.actquant import calibrate as _calibrate
from wnconvert.convert.actquant import freeze_bn as _freeze_bn
from wnconvert.convert.actquant.bitexact import CONTRACT as BIT_EXACT
from wnconvert.convert.actquant.deploy import deployed_precision
from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.configs import FoldConfig, VerifyConfig
from wnconvert.convert.errors import ParityError, UserInputError
from wnconvert.convert.export import ExportConfig, export_onnx
from wnconvert.convert.fold import FoldResult, fold_model
from wnconvert.convert.onnx_ranges import check_unit_range, weight_ranges
from wnconvert.convert.quantize import QuantOptions, TrainedNetwork, quantize
from wnconvert.convert.quantize.target_rules import check_file
from wnconvert.convert.quantize.targets import DEFAULT_TARGET, get_target
from wnconvert.convert.verify import verify as _parity

from .qat_config import QATConfig

LOSSLESS_ACTIVATIONS = "lossless-activations"   # the contract of a float-scale QAT file
FP32 = "fp32-parity"                            # a float network's file against it in float64


def prepare(model: nn.Module, config: QATConfig = QATConfig()) -> nn.Module:
    """A quantization-aware copy of ``model`` (the model itself is not modified).

    Every conv/linear weight is reparametrized under ``config.scheme`` (on its ``weight_bits``
    grid when set). With ``act_bits`` the copy is a ``torch.fx`` GraphModule whose activations are
    fake-quantized at every tensor the deployed integer graph holds (scales at 1 until
    :func:`calibrate`); without it, the reparametrized model (the float path: :func:`fold`).
    Raises UserInputError naming an operation the integer graph cannot hold (``mixed_precision``
    keeps the common activation functions in float) or a model already reparametrized."""
    if not isinstance(model, nn.Module):
        raise UserInputError(f"prepare takes an nn.Module, not {type(model).__name__}")
    if not isinstance(config, QATConfig):
        raise UserInputError(f"prepare takes a wnconvert.QATConfig, not {type(config).__name__}")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise UserInputError("prepare takes the plain network: this one already has parametrized weights")
    work = copy.deepcopy(model)  # plain: the copy owns its parametrization classes
    apply_scheme(work, config.scheme_config())
    if config.act_bits is None:
        return work
    return prepare_qat(work, ActQuantConfig(config.act_bits, config.act_range, config.scale_format,
                                            config.mixed_precision, config.residual_conv, config.rounding))


def _qat(qmodel) -> fx.GraphModule:
    if not (isinstance(qmodel, fx.GraphModule) and "act_points" in qmodel.meta):
        raise UserInputError("this needs the model wnconvert.prepare returned for a QATConfig with act_bits")
    return qmodel


def calibrate(qmodel: nn.Module, batches: Iterable) -> dict[str, float]:
    """Set every activation scale from a few batches (tensors, or ``(images, labels)`` pairs as a
    DataLoader yields them; 4 of your training batches are what a run uses). BatchNorm statistics
    are left as they were. Returns point -> scale."""
    qat = _qat(qmodel)
    images = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not images:
        raise UserInputError("calibrate needs at least one batch")
    return _calibrate(qat, images)


def freeze_bn(qmodel: nn.Module) -> int:
    """From now on every BatchNorm fused into a conv uses (and keeps) its running statistics, in
    training too, so training and the deployed layer agree; a run does it for its last epoch.
    Returns how many were frozen."""
    return _freeze_bn(_qat(qmodel))


def fold(model: nn.Module, example_input: torch.Tensor, config: FoldConfig = FoldConfig()) -> FoldResult:
    """The float path: fold a reparametrized model (:func:`prepare` without ``act_bits``, or
    :func:`apply_scheme`) into a plain one whose stored conv/linear weights lie in [-1, 1]
    (``.model``), with a per-layer certificate (``.certificate()``). ``model`` is not modified."""
    return fold_model(model, example_input.detach().cpu().float(), config)


@dataclass
class ExportReport:
    """What :func:`export` wrote: the file, its precision (``fp32``, ``int8`` or ``int4``), the
    target, the contract :func:`verify` checks it under, and the exporter's details."""

    path: Path
    precision: str
    target: str
    contract: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "precision": self.precision, "target": self.target,
                "contract": self.contract, **self.details}


def _on_cpu(model: nn.Module) -> nn.Module:
    """``model`` if it lives on the CPU, else a CPU copy (the user's model stays where it is)."""
    if all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()]):
        return model
    return copy.deepcopy(model).cpu()


def _example(example_input) -> torch.Tensor:
    x = torch.as_tensor(example_input)
    if x.dim() != 4:
        raise UserInputError(f"example_input is one NCHW batch, not a tensor of shape {tuple(x.shape)}")
    return x.detach().cpu().float()


def export(qmodel: nn.Module, path, *, example_input, target: str = DEFAULT_TARGET,
           container: str | None = None) -> ExportReport:
    """Write the deployed file of ``qmodel`` to ``path`` (atomically; nothing is left behind on failure).

    A :func:`prepare` model with ``act_bits``: the integer QDQ ONNX file with its trained scales,
    exactly what ``wnconvert export RUN --precision int8|int4 --target T`` writes for a run:
    int8 for 5..8-bit weights, int4 for 2..4-bit ones (their 4-bit values in ``container``, by
    default the target's). ``target``: ort-cpu, openvino, or fixed-point (power-of-two scales only).
    A reparametrized float model: its fold as fp32 ONNX, every stored weight in [-1, 1].
    ``example_input``: one NCHW batch (its shape is the file's, batch dynamic)."""
    path = Path(path)
    x = _example(example_input)
    preset = get_target(target)
    model = _on_cpu(qmodel)
    if not (isinstance(model, fx.GraphModule) and "act_points" in model.meta):
        if preset.name != DEFAULT_TARGET:
            raise UserInputError(f"a float network's file is plain fp32 ONNX; target {target!r} is for "
                                 "the integer files of a model prepared with act_bits")
        folded = fold_model(model, x[:2])
        export_onnx(folded.model, x[:2], path,
                    ExportConfig(constant_folding=not folded.weight_side_scales))
        ranges = weight_ranges(onnx.load(str(path)))
        check_unit_range(ranges, str(path))
        return ExportReport(path, "fp32", preset.name, FP32,
                            {"stored_max_abs": folded.max_stored, "weights": len(ranges)})
    po2 = act_config(model).po2
    if preset.act_runs == "refused":
        raise UserInputError(f"target {preset.name} does not take a QAT model's integer file (unsigned "
                             "activations, int32 biases); export it for ort-cpu or openvino")
    if preset.act_runs == "po2" and not po2:
        raise UserInputError(f"target {preset.name} needs power-of-two scales (QATConfig scale_format='po2')")
    precision = deployed_precision(model)
    box = (container or preset.container) if precision == "int4" else "int4"

    def rules(tmp: Path) -> None:
        found = check_file(tmp, preset.rules)["violations"]
        if found:
            raise ParityError(f"{path.name} breaks the {preset.name} rules: {found[0]}; nothing was written")

    options = QuantOptions(precision=precision, act_bits=None, scales="trained", container=box)
    done = quantize(TrainedNetwork(model, (1, *x.shape[1:])), path, options, check=rules)
    details = done.trained.to_dict() | ({"shifts": done.shifts} if done.shifts is not None else {})
    return ExportReport(path, precision, preset.name, BIT_EXACT if po2 else LOSSLESS_ACTIVATIONS, details)


@dataclass
class VerifyReport:
    """:func:`verify`'s answer: ``passed``, the ``contract`` it was judged under, the ``failures``
    (one line each) and the checker's full record (``details``, per point and per level)."""

    passed: bool
    contract: str
    failures: list[str]
    inputs: int
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "contract": self.contract, "failures": list(self.failures),
                "inputs": self.inputs, "details": self.details}


def verify(qmodel: nn.Module, path, *, inputs, config: VerifyConfig = VerifyConfig()) -> VerifyReport:
    """Check the file at ``path`` against ``qmodel`` on ``inputs`` (float NCHW images: a tensor
    or array), under the contract ``wnconvert verify`` chooses for a run's file:

    * ``bit-exact`` (power-of-two scales): the eval-mode fake-quant model, the pure-integer
      reference and onnxruntime (optimizations off and on) hold the same integers at every
      quantized tensor;
    * ``lossless-activations`` (float scales): onnxruntime's integers equal the model's at every
      point except at rounding ties, and no image with a clear margin changes its top-1;
    * ``fp32-parity`` (a float network): the file against the model in float64 within
      ``config`` (rtol, cosine, top-1).
    """
    x = torch.as_tensor(np.asarray(inputs, np.float32) if not isinstance(inputs, torch.Tensor) else inputs)
    x = x.detach().cpu().float()
    if x.dim() != 4 or len(x) == 0:
        raise UserInputError(f"inputs are a non-empty NCHW batch, not shape {tuple(x.shape)}")
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path} does not exist")
    model = _on_cpu(qmodel)
    if not (isinstance(model, fx.GraphModule) and "act_points" in model.meta):
        rep = _parity(model, x, onnx_path=path, config=config, inputs_name=f"{len(x)} samples")
        return VerifyReport(rep.passed, FP32, rep.failures(), len(x), rep.to_dict())
    if act_config(model).po2:
        rep = check_bit_exact(model, path, x)
        return VerifyReport(rep.passed, BIT_EXACT, list(rep.failures), len(x), rep.to_dict())
    res = check_lossless_activations(model, path, x)
    return VerifyReport(res["passed"], LOSSLESS_ACTIVATIONS, list(res["failures"]), len(x),
                        {"levels": res["levels"], "tie_window": res["tie_window"]})
