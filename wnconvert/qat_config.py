"""``wnconvert.QATConfig``: what :func:`wnconvert.prepare` makes of a network, as one frozen,
versioned record (no torch: it loads with ``import wnconvert``).

It is the record a run keeps: ``QATConfig.from_dict`` reads its own ``to_dict`` and also a run's
``manifest.json`` (the ``scheme`` record and the ``act`` record of an ``--act-bits`` run), so a
network trained with ``wnconvert finetune --weight-bits 8 --act-bits 8`` and one prepared in your
own script under ``QATConfig.from_dict(manifest)`` are the same quantized network.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from wnconvert.convert.configs import SchemeConfig, check_act_settings
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.names import DEFAULT_TARGET, PLACEMENT_TARGETS, ROUNDINGS, TRAIN_PLACEMENTS, WEIGHT_BITS_SCHEMES

VERSION = 1


@dataclass(frozen=True)
class QATConfig:
    """Weight and activation quantization-aware training settings.

    ``scheme``: the weight-range scheme every conv/linear weight is reparametrized with
    (``wnconvert schemes``); with ``weight_bits`` B (2..8, ``layer-max`` or ``channel-max``) the
    normalized weight is fake-quantized to the symmetric B-bit grid on [-1, 1].
    ``act_bits`` A (2..8, needs ``weight_bits``; None: weights only): every activation tensor the
    integer graph holds is fake-quantized to A bits, its scale calibrated then ``act_range``
    (``learned`` by LSQ, or ``frozen``). ``scale_format``: ``float`` scales, or ``po2`` (every scale
    a power of two: the exported file is then checked bit-exact). ``mixed_precision``: hardswish,
    SiLU, sigmoid, GELU, tanh and the squeeze-excite multiply stay in float instead of being refused.
    ``target``: the runtime whose placement of quantization points is trained (``ort-cpu``, or
    ``openvino``: a conv read only by a residual add stays float). ``exclude`` (name patterns),
    ``skip_depthwise``, ``gain`` and ``scale_grad`` are the scheme's options (``wnconvert finetune
    --help``). ``freeze_bn_epochs`` is the run's BatchNorm schedule, kept for the round trip with a
    manifest: in your own loop you call :func:`wnconvert.freeze_bn` yourself. ``weight_range``:
    ``max`` (the grid's range at each channel's largest |w|) or ``learned`` (a learned clip,
    docs/learned_range.md). ``rounding``: ``onnx``, or ``tflite`` (po2 only: the eval-mode model
    computes TensorFlow Lite Micro's integer arithmetic, docs/tflite-training.md).
    """

    scheme: str = "layer-max"
    weight_bits: int | None = 8
    act_bits: int | None = 8
    act_range: str = "learned"
    scale_format: str = "float"
    mixed_precision: bool = False
    target: str = DEFAULT_TARGET
    exclude: tuple[str, ...] = ()
    skip_depthwise: bool = False
    gain: str = "frozen"
    scale_grad: str = "full"
    freeze_bn_epochs: int | None = None
    weight_range: str = "max"
    rounding: str = "onnx"

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        self.scheme_config()  # validates the scheme's part
        if self.target not in TRAIN_PLACEMENTS:
            raise UserInputError(f"unknown target {self.target!r}; choose one of: {', '.join(TRAIN_PLACEMENTS)}")
        if self.act_bits is None:
            if (self.scale_format != "float" or self.mixed_precision or self.act_range != "learned"
                    or self.rounding != "onnx"):
                raise UserInputError("act_range, scale_format, mixed_precision and rounding apply with act_bits only")
            return
        check_act_settings(self.act_bits, self.act_range, self.scale_format, self.mixed_precision,
                           self.residual_conv)
        if self.rounding not in ROUNDINGS:
            raise UserInputError(f"unknown rounding {self.rounding!r}; choose one of: {', '.join(ROUNDINGS)}")
        if self.rounding == "tflite" and self.scale_format != "po2":
            raise UserInputError("rounding tflite computes TFLite's integer arithmetic exactly on power-of-two "
                                 "scales: it needs scale_format po2")
        if not self.weight_bits or self.scheme not in WEIGHT_BITS_SCHEMES:
            raise UserInputError(f"act_bits needs weight_bits and a scheme with a fixed grid "
                                 f"({' or '.join(WEIGHT_BITS_SCHEMES)}): activations are quantized only on "
                                 "top of weights trained on their grid")
        if self.freeze_bn_epochs is not None and self.freeze_bn_epochs < 0:
            raise UserInputError("freeze_bn_epochs must be >= 0")

    @property
    def residual_conv(self) -> str:
        """The placement ``target`` trains: ``quantized`` or ``float`` (convert/names.py TRAIN_PLACEMENTS)."""
        return TRAIN_PLACEMENTS[self.target]

    def scheme_config(self) -> SchemeConfig:
        """The weight part, as ``wnconvert.apply_scheme`` takes it."""
        return SchemeConfig(self.scheme, self.gain, self.scale_grad, self.exclude, self.skip_depthwise,
                            weight_bits=self.weight_bits, weight_range=self.weight_range)

    def act_record(self) -> dict | None:
        """The ``act`` record of a run's manifest.json (None without ``act_bits``)."""
        if self.act_bits is None:
            return None
        return {"bits": self.act_bits, "range": self.act_range, "freeze_bn_epochs": self.freeze_bn_epochs,
                "scale_format": self.scale_format, "mixed_precision": self.mixed_precision,
                "residual_conv": self.residual_conv, "rounding": self.rounding}

    def to_dict(self) -> dict:
        """A JSON-ready dict with ``version``; :meth:`from_dict` reads it back equal."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["exclude"] = list(self.exclude)
        return {"version": VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "QATConfig":
        """A config from :meth:`to_dict`'s dict, or from a run's manifest.json (its ``scheme`` and
        ``act`` records; a run without ``--act-bits`` gives ``act_bits=None``)."""
        if not isinstance(d, dict):
            raise UserInputError(f"a QATConfig record is a dict, not {type(d).__name__}")
        if isinstance(d.get("scheme"), dict):
            return cls._from_manifest(d)
        version = d.get("version", VERSION)
        if not isinstance(version, int) or version > VERSION:
            raise UserInputError(f"QATConfig record version {version!r} is newer than this wnconvert "
                                 f"reads ({VERSION})")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - {"version"})
        if unknown:
            raise UserInputError(f"unknown QATConfig field {unknown[0]!r}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def _from_manifest(cls, m: dict) -> "QATConfig":
        s, act = m["scheme"], m.get("act")
        scheme = dict(scheme=s.get("scheme", "layer-max"), weight_bits=s.get("weight_bits"),
                      exclude=tuple(s.get("exclude") or ()), skip_depthwise=bool(s.get("skip_depthwise", False)),
                      gain=s.get("gain", "frozen"), scale_grad=s.get("scale_grad", "full"),
                      weight_range=s.get("weight_range", "max"))
        if not act:
            return cls(**scheme, act_bits=None)
        return cls(**scheme, act_bits=int(act["bits"]), act_range=act.get("range", "learned"),
                   scale_format=act.get("scale_format", "float"),
                   mixed_precision=bool(act.get("mixed_precision", False)),
                   target=PLACEMENT_TARGETS[act.get("residual_conv", "quantized")],
                   freeze_bn_epochs=act.get("freeze_bn_epochs"), rounding=act.get("rounding", "onnx"))
