"""Activation quantization-aware fine-tuning in a run (``wnconvert finetune --act-bits A``).

The run's flow: ``apply_scheme`` (``--weight-bits B``, layer-max / channel-max) -> calibrate the
activation ranges on a few training batches -> :func:`~wnconvert.convert.actquant.prepare_qat` ->
train the fx GraphModule (BatchNorm frozen for the last ``freeze_bn_epochs``) -> checkpoint.safetensors
holds the QAT state (``qlayers.*``, ``act_quant.*``).

Two views of one trained network are loaded back from that state (:func:`load_models`):

* the QAT model, the eval-mode fake-quant network, which *is* the deployed integer graph
  (``model.int8.onnx`` / ``model.int4.onnx``, contract ``lossless-activations``);
* the float network: the same reparametrized weights and BatchNorm statistics in the plain
  torchvision model, without activation quantization. ``model.onnx`` of an ``--act-bits`` run is
  that float network (fold/export/verify under the fp32 contract as before); it is not the
  deployed network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import fx, nn
from torch.utils.data import DataLoader

from wnconvert.convert.actquant import ActQuantConfig, calibrate, freeze_bn, prepare_qat, qlayers
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.names import WEIGHT_BITS_SCHEMES
from wnconvert.convert.schemes import SchemeConfig

CALIB_BATCHES = 4          # training batches the activation ranges are calibrated on
CALIB_SEED = 1234          # their fixed draw (the training seed stream is not touched)


@dataclass(frozen=True)
class ActSettings:
    """``--act-bits``, ``--act-range``, ``--freeze-bn-epochs`` (None: 1 when the run trains
    more than one epoch, else 0), ``--scale-format`` (float | po2), ``--mixed-precision`` and the
    placement ``--target`` trains (``residual_conv``: float for openvino), ``--rounding`` (onnx | tflite:
    the eval-mode requantization, convert/actquant/tflite_points.py)."""

    bits: int
    range: str = "learned"
    freeze_bn_epochs: int | None = None
    scale_format: str = "float"
    mixed_precision: bool = False
    residual_conv: str = "quantized"
    rounding: str = "onnx"

    def __post_init__(self) -> None:
        _ = self.quant  # validates them
        if self.freeze_bn_epochs is not None and self.freeze_bn_epochs < 0:
            raise UserInputError("--freeze-bn-epochs must be >= 0")

    @property
    def quant(self) -> ActQuantConfig:
        return ActQuantConfig(self.bits, self.range, self.scale_format, self.mixed_precision, self.residual_conv,
                              self.rounding)

    def frozen_epochs(self, epochs: int) -> int:
        if self.freeze_bn_epochs is None:
            return 1 if epochs > 1 else 0
        if self.freeze_bn_epochs > epochs:
            raise UserInputError(f"--freeze-bn-epochs {self.freeze_bn_epochs} exceeds --epochs {epochs}")
        return self.freeze_bn_epochs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ActSettings | None":
        if not d:
            return None
        return cls(int(d["bits"]), d.get("range", "learned"), d.get("freeze_bn_epochs"),
                   d.get("scale_format", "float"), bool(d.get("mixed_precision", False)),
                   d.get("residual_conv", "quantized"), d.get("rounding", "onnx"))


def check_act_request(scheme: SchemeConfig, act: ActSettings | None, *, data: str | None,
                      gpu_decode: bool = False, epochs: int = 0) -> None:
    """Refuse, before anything is built or written, an ``--act-bits`` run that cannot work."""
    if act is None:
        return
    act.frozen_epochs(epochs)
    if act.scale_format == "po2" and (not scheme.weight_bits or scheme.scheme not in WEIGHT_BITS_SCHEMES):
        raise UserInputError(f"--scale-format po2 needs --weight-bits B and a fixed-grid scheme "
                             f"({' or '.join(WEIGHT_BITS_SCHEMES)}); got --scheme {scheme.scheme}"
                             + ("" if scheme.weight_bits else " without --weight-bits"))
    if not scheme.weight_bits:
        raise UserInputError("--act-bits needs --weight-bits B: activations are quantized only on "
                             "top of weights trained on their grid")
    if scheme.scheme not in WEIGHT_BITS_SCHEMES:
        raise UserInputError(f"--act-bits needs a scheme with a fixed grid ({' or '.join(WEIGHT_BITS_SCHEMES)}), "
                             f"not {scheme.scheme}")
    if not data:
        raise UserInputError("--act-bits needs --data: activation ranges are calibrated on training images")
    if gpu_decode:
        raise UserInputError("--act-bits does not support --gpu-decode yet")


def calibration_batches(train_set, batch_size: int, n: int = CALIB_BATCHES) -> list[torch.Tensor]:
    """The first ``n`` batches of a fixed shuffle of the training set (images only)."""
    g = torch.Generator().manual_seed(CALIB_SEED)
    state = torch.random.get_rng_state()  # augmentations draw from the global stream: restore it
    try:
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=g, num_workers=0)
        out = []
        for x, _ in loader:
            out.append(x)
            if len(out) == n:
                break
    finally:
        torch.random.set_rng_state(state)
    return out


def prepare_act_model(model: nn.Module, act: ActSettings, batches: list[torch.Tensor] | None) -> fx.GraphModule:
    """The QAT copy of the reparametrized ``model``, its ranges calibrated on ``batches`` (None: a
    resumed run, whose checkpoint holds them). Unsupported ops raise UserInputError naming the op."""
    qat = prepare_qat(model, act.quant)
    if batches:
        calibrate(qat, batches)
    return qat.eval()


def act_model(model: nn.Module, act: ActSettings | None, data, train_cfg, resume: bool) -> fx.GraphModule | None:
    """The run's QAT model (None without ``--act-bits``), calibrated unless resumed."""
    if act is None:
        return None
    if data is None:
        raise UserInputError("--act-bits with --epochs 0 and --no-export has nothing to do")
    batch = train_cfg.batch_size if train_cfg is not None else 64
    return prepare_act_model(model, act, None if resume else calibration_batches(data.train, batch))


def freeze_bn_hook(qat: nn.Module, act: ActSettings, epochs: int) -> Callable[[int], None] | None:
    """Called at the start of each epoch: freezes BatchNorm from epoch ``epochs - frozen + 1`` on
    (the flag lives in the state_dict, so a resumed run keeps it)."""
    frozen = act.frozen_epochs(epochs)
    if frozen <= 0:
        return None
    first = epochs - frozen + 1

    def hook(epoch: int) -> None:
        if epoch >= first:
            freeze_bn(qat)
    return hook


# -- the two views of the checkpoint ------------------------------------------------------------

class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear)) or super().is_leaf_module(m, qualname)


def _bn_after(model: nn.Module) -> dict[str, str]:
    """conv/linear qualname -> the BatchNorm it feeds alone (the pairs prepare_qat fuses)."""
    graph = _Tracer().trace(model)
    out = {}
    for n in graph.nodes:
        users = list(n.users)
        if n.op == "call_module" and len(users) == 1 and users[0].op == "call_module" and \
                isinstance(model.get_submodule(users[0].target), (nn.BatchNorm1d, nn.BatchNorm2d)):
            out[n.target] = users[0].target
    return out


@torch.no_grad()
def copy_to_float(qat: fx.GraphModule, plain: nn.Module) -> nn.Module:
    """Write the QAT model's weights and BatchNorm state into the plain reparametrized model
    (the float network); every tensor of ``plain`` is written, or this raises."""
    bn_of = _bn_after(plain)
    state: dict[str, torch.Tensor] = {}
    for q in qlayers(qat):
        state.update({f"{q.name}.{k}": v for k, v in q.layer.state_dict().items()})
        if q.bn is not None:
            state.update({f"{bn_of[q.name]}.{k}": v for k, v in q.bn.state_dict().items()})
    missing = set(plain.state_dict()) - set(state)
    if missing:
        raise UserInputError(f"the QAT checkpoint lacks {sorted(missing)[0]} of the float model")
    plain.load_state_dict(state, strict=True)
    return plain
