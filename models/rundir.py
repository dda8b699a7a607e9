"""A run directory: its file names, its manifest and the one read-modify-write of report.json.

Run directory (all written atomically):

* ``manifest.json``  a :class:`Manifest`: model, weights, data, scheme/fold/export/verify/train
  configs, preprocessing, library versions, sha256 of each artifact. Written first (status
  ``running``) and last (``complete``).
* ``checkpoint.safetensors``  the reparametrized state (raw weights, gains, BN statistics).
* ``model.onnx``  fp32, input NCHW float32 already normalized per ``preprocess``, output logits;
  ``model.<precision>.onnx`` after a low-precision export.
* ``report.json``  what was reparametrized, the step-0 deviation, the fold certificate, weight
  ranges and parity (and the ONNX accuracy when data was given); ``quantized`` and ``verify``
  entries added by later commands.
* ``metrics.jsonl``  one JSON object per line: training steps and epochs.
* ``train/last.pt``, ``train/best.pt``  training checkpoints (resume).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import save_file
from torch import nn

from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.artifacts import atomic_path, read_json, sha256, write_json
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.export import ExportConfig
from wnconvert.convert.fold import FoldConfig
from wnconvert.convert.pipeline import ONNX_NAME
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.convert.verify import VerifyConfig

from .act_run import ActSettings, copy_to_float, prepare_act_model
from .data import Preprocess
from .train_config import TrainConfig
from .zoo import build_model, load_into, load_state_file

MANIFEST = "manifest.json"
REPORT = "report.json"
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
ONNX = ONNX_NAME

# 1: the first versioned layout. Manifests without "version" (written before it existed) have the
# same keys, some missing (gpu_decode, newer train options); their dataclass defaults fill them.
MANIFEST_VERSION = 1


def config_from_dict(cls, d: dict | None):
    """``cls(**d)`` keeping only ``cls``'s fields, so a manifest written by another version (a
    field added or dropped since) still loads; the dataclass validates the values."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in (d or {}).items() if k in names})


@dataclass
class Manifest:
    """What ``manifest.json`` holds; every reader and writer goes through ``to_dict``/``from_dict``."""

    model: str
    num_classes: int
    preprocess: Preprocess
    weights: str = "none"
    data: str | None = None
    limit_train: int | None = None
    limit_val: int | None = None
    gpu_decode: bool = False
    scheme: SchemeConfig = field(default_factory=SchemeConfig)
    fold: FoldConfig = field(default_factory=FoldConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    train: TrainConfig | None = None
    act: ActSettings | None = None   # --act-bits runs (models/act_run.py); None in older manifests
    status: str = "running"
    created: str = ""
    versions: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.preprocess.image_size, self.preprocess.image_size)

    def to_dict(self) -> dict:
        return {
            "version": self.version, "status": self.status, "created": self.created,
            "model": self.model, "weights": self.weights, "num_classes": self.num_classes,
            "data": self.data, "limit_train": self.limit_train, "limit_val": self.limit_val,
            "gpu_decode": self.gpu_decode, "preprocess": self.preprocess.to_dict(),
            "input": {"name": "input", "layout": "NCHW", "dtype": "float32",
                      "shape": ["batch", *self.input_shape], "normalized": True},
            "output": {"name": "logits", "shape": ["batch", self.num_classes]},
            "scheme": asdict(self.scheme), "fold": asdict(self.fold), "export": asdict(self.export),
            "verify": asdict(self.verify),
            "train": self.train.to_dict() if self.train is not None else None,
            "act": self.act.to_dict() if self.act is not None else None,
            "versions": self.versions, "artifacts": self.artifacts,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> "Manifest":
        version = d.get("version", 0)  # 0: written before manifests had a version
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            raise UserInputError(f"{where} has manifest version {version!r}; this wnconvert reads "
                                 f"up to {MANIFEST_VERSION} (upgrade wnconvert)")
        try:
            return cls(
                model=d["model"], num_classes=d["num_classes"],
                preprocess=Preprocess.from_dict(d["preprocess"]), weights=d.get("weights", "none"),
                data=d.get("data"), limit_train=d.get("limit_train"), limit_val=d.get("limit_val"),
                gpu_decode=d.get("gpu_decode", False),
                scheme=config_from_dict(SchemeConfig, d["scheme"]),
                fold=config_from_dict(FoldConfig, d.get("fold")),
                export=config_from_dict(ExportConfig, d.get("export")),
                verify=config_from_dict(VerifyConfig, d.get("verify")),
                train=config_from_dict(TrainConfig, d["train"]) if d.get("train") else None,
                act=ActSettings.from_dict(d.get("act")),
                status=d.get("status", "complete"), created=d.get("created", ""),
                versions=dict(d.get("versions") or {}), artifacts=dict(d.get("artifacts") or {}),
                version=MANIFEST_VERSION)
        except KeyError as e:
            raise UserInputError(f"{where} lacks {e}") from None
        except (TypeError, AttributeError, ValueError) as e:
            raise UserInputError(f"{where} is malformed: {e}") from None


class RunDir:
    """The files of one run directory; ``update_report`` is the one read-modify-write of report.json."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    manifest_path = property(lambda self: self.path / MANIFEST)
    report_path = property(lambda self: self.path / REPORT)
    checkpoint_path = property(lambda self: self.path / CHECKPOINT)
    metrics_path = property(lambda self: self.path / METRICS)
    onnx_path = property(lambda self: self.path / ONNX)

    def exists(self) -> bool:
        return self.manifest_path.exists()

    # -- manifest -----------------------------------------------------------------------------

    def manifest(self) -> Manifest:
        if not self.path.is_dir():
            raise UserInputError(f"{self.path} is not a run directory")
        if not self.manifest_path.exists():
            raise UserInputError(f"{self.path} has no {MANIFEST}; is it a wnconvert run directory?")
        return Manifest.from_dict(read_json(self.manifest_path), f"{self.path}/{MANIFEST}")

    def write_manifest(self, manifest: Manifest) -> None:
        write_json(self.manifest_path, manifest.to_dict())

    def finish(self, manifest: Manifest) -> Manifest:
        """Mark the run complete and record the sha256 of every artifact present."""
        manifest.status = "complete"
        manifest.artifacts = {p.name: sha256(p) for p in sorted(self.path.iterdir())
                              if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
        self.write_manifest(manifest)
        return manifest

    # -- report.json --------------------------------------------------------------------------

    def report(self) -> dict:
        return read_json(self.report_path) if self.report_path.exists() else {}

    def write_report(self, report: dict) -> None:
        """Replace report.json (a new run); later commands merge with :meth:`update_report`."""
        write_json(self.report_path, report)

    def update_report(self, change: dict | Callable[[dict], Any]) -> dict:
        """Read report.json (empty when absent), merge ``change`` into it (a dict of top-level
        entries, or a function editing the report in place) and write it back atomically."""
        report = self.report()
        if callable(change):
            change(report)
        else:
            report.update(change)
        write_json(self.report_path, report)
        return report

    # -- the trained model --------------------------------------------------------------------

    def save_model_state(self, model: nn.Module) -> None:
        """checkpoint.safetensors: every tensor of the reparametrized model's state_dict."""
        # safetensors refuses shared or non-contiguous storage; clone every tensor.
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        with atomic_path(self.checkpoint_path) as tmp:
            save_file(state, str(tmp))

    def load(self) -> tuple[Manifest, nn.Module, Preprocess]:
        """The manifest, the reparametrized model with its checkpoint loaded, its preprocessing.
        For an ``--act-bits`` run: the float network (see models/act_run.py); :meth:`load_qat`
        gives the fake-quant one."""
        manifest, model, _ = self._load_both()
        return manifest, model, manifest.preprocess

    def load_qat(self) -> tuple[Manifest, nn.Module]:
        """The manifest and the eval-mode QAT model of an ``--act-bits`` run."""
        manifest, _, qat = self._load_both()
        if qat is None:
            raise UserInputError(f"{self.path} was not trained with --act-bits")
        return manifest, qat

    def _load_both(self) -> tuple[Manifest, nn.Module, nn.Module | None]:
        manifest = self.manifest()
        model = build_model(manifest.model, "none", manifest.num_classes).model.eval()
        apply_scheme(model, manifest.scheme)
        qat = prepare_act_model(model, manifest.act, None) if manifest.act is not None else None
        target = qat if qat is not None else model
        state = load_state_file(self.checkpoint_path)
        own = target.state_dict()
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise UserInputError(f"{self.path}/{CHECKPOINT} does not match the model in {MANIFEST}")
        load_into(target, state)
        if qat is not None:
            copy_to_float(qat, model)
        return manifest, model, qat
