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

import functools
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.artifacts import atomic_path, ensure_writable_dir, read_json, sha256, write_json
from wnconvert.convert.errors import ParityError, UserInputError
from wnconvert.convert.export import ExportConfig
from wnconvert.convert.fold import FoldConfig
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.convert.verify import VerifyConfig

from ..data.data import Preprocess
from ..files import CHECKPOINT, MANIFEST, METRICS, ONNX, REPORT  # noqa: F401 (re-exported)
from ..train.act_run import ActSettings, copy_to_float, prepare_act_model
from ..train.checkpoint import LAST, train_dir
from ..train.train_config import TrainConfig
from ..zoo.zoo import build_model, load_into, load_state_file
from .lock import LOCK_NAME, OUT_ADVICE, is_locked, locked
from .manifest_version import MANIFEST_VERSION, check_manifest_version  # noqa: F401 (MANIFEST_VERSION re-exported)

TEMP_DIRS = (".export-", ".quant-")  # tempfile prefixes of convert/export.py and convert/quantize


def config_from_dict(cls, d: dict | None):
    """``cls(**d)`` keeping only ``cls``'s fields, so a manifest written by another version (a
    field added or dropped since) still loads; the dataclass validates the values."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in (d or {}).items() if k in names})


# The manifest's scalar entries and the types they must have (None allowed where the default is).
_TYPES = {"model": str, "num_classes": int, "weights": str, "data": (str, type(None)),
          "limit_train": (int, type(None)), "limit_val": (int, type(None)), "gpu_decode": bool,
          "no_export": bool, "status": str, "created": str, "versions": dict, "artifacts": dict,
          "preprocess": dict, "scheme": dict, "fold": (dict, type(None)), "export": (dict, type(None)),
          "verify": (dict, type(None)), "train": (dict, type(None)), "targets": (dict, type(None))}


def _check_types(d: Any, where: str) -> None:
    """One line naming the first entry of a manifest that does not have its type."""
    if not isinstance(d, dict):
        raise UserInputError(f"{where} is not a JSON object")
    for key, types in _TYPES.items():
        v = d.get(key)
        if key in d and (not isinstance(v, types) or (isinstance(v, bool) and bool not in
                                                      (types if isinstance(types, tuple) else (types,)))):
            raise UserInputError(f"{where}: {key!r} has the wrong type ({type(v).__name__})")
    if isinstance(d.get("num_classes"), int) and d["num_classes"] < 1:
        raise UserInputError(f"{where}: num_classes must be at least 1")


def _before_scale_lr(train: dict, act) -> dict:
    """An ``--act-bits`` run whose manifest predates the ``scales`` parameter group (no
    ``scale_lr``) trained its learned scales with the weights' optimizer: ``scale_lr=None`` keeps
    that, so the run resumes and repeats exactly as it was trained (a run without learned scales
    takes the default, which changes nothing for it)."""
    if not act or not isinstance(train, dict) or "scale_lr" in train:
        return train
    return train | {"scale_lr": None}


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
    no_export: bool = False          # finetune --no-export: a resumed run stays unexported
    scheme: SchemeConfig = field(default_factory=SchemeConfig)
    fold: FoldConfig = field(default_factory=FoldConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    train: TrainConfig | None = None
    act: ActSettings | None = None   # --act-bits runs (models/train/act_run.py); None in older manifests
    targets: dict = field(default_factory=dict)  # file -> {"target", "overridden"} (export --target)
    status: str = "running"
    created: str = ""
    versions: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.preprocess.image_size, self.preprocess.image_size)

    @property
    def po2(self) -> bool:
        """Trained with ``--scale-format po2``: every scale of its integer files a power of two."""
        return self.act is not None and self.act.scale_format == "po2"

    def to_dict(self) -> dict:
        return {
            "version": self.version, "status": self.status, "created": self.created,
            "model": self.model, "weights": self.weights, "num_classes": self.num_classes,
            "data": self.data, "limit_train": self.limit_train, "limit_val": self.limit_val,
            "gpu_decode": self.gpu_decode, "no_export": self.no_export, "preprocess": self.preprocess.to_dict(),
            "input": {"name": "input", "layout": "NCHW", "dtype": "float32",
                      "shape": ["batch", *self.input_shape], "normalized": True},
            "output": {"name": "logits", "shape": ["batch", self.num_classes]},
            "scheme": asdict(self.scheme), "fold": asdict(self.fold), "export": asdict(self.export),
            "verify": asdict(self.verify),
            "train": self.train.to_dict() if self.train is not None else None,
            "act": self.act.to_dict() if self.act is not None else None, "targets": self.targets,
            "versions": self.versions, "artifacts": self.artifacts,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> "Manifest":
        _check_types(d, where)
        check_manifest_version(d, where)  # the one rule for every reader (manifest_version.py)
        try:
            return cls(
                model=d["model"], num_classes=d["num_classes"],
                preprocess=Preprocess.from_dict(d["preprocess"]), weights=d.get("weights", "none"),
                data=d.get("data"), limit_train=d.get("limit_train"), limit_val=d.get("limit_val"),
                gpu_decode=d.get("gpu_decode", False), no_export=d.get("no_export", False),
                scheme=config_from_dict(SchemeConfig, d["scheme"]),
                fold=config_from_dict(FoldConfig, d.get("fold")),
                export=config_from_dict(ExportConfig, d.get("export")),
                verify=config_from_dict(VerifyConfig, d.get("verify")),
                train=(config_from_dict(TrainConfig, _before_scale_lr(d["train"], d.get("act")))
                       if d.get("train") else None),
                act=ActSettings.from_dict(d.get("act")), targets=dict(d.get("targets") or {}),
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

    # -- ownership ----------------------------------------------------------------------------

    @contextmanager
    def writing(self, create: bool = False) -> Iterator["RunDir"]:
        """Hold the directory's write lock (:mod:`.lock`) for the block (``create``: make the
        directory first): a second writer gets one line naming this process. Read-only commands
        never take it."""
        if create:
            ensure_writable_dir(self.path)
        elif not self.path.is_dir():
            raise UserInputError(f"{self.path} is not a run directory")
        with locked(self.path, OUT_ADVICE if create else ""):  # export/verify take no --out
            self.remove_leftovers()
            yield self

    def remove_leftovers(self) -> None:
        """Temporary files and folders of writers that died (``.NAME.*.tmp``, ``.export-*/``,
        ``.quant-*/``), in the run and in ``train/``. Call it holding the lock: no live writer
        owns them then."""
        for folder in (self.path, train_dir(self.path)):
            for p in folder.iterdir() if folder.is_dir() else ():
                if p.is_dir() and not p.is_symlink() and p.name.startswith(TEMP_DIRS):
                    shutil.rmtree(p)
                elif p.name.startswith(".") and p.name.endswith(".tmp") and not p.is_dir():
                    p.unlink()

    def abandoned(self, held: bool = False) -> bool:
        """A run that started and never trained: its manifest says ``running``, no process holds
        it (``held``: this process does) and it has no ``train/last.pt``. A rerun may replace it."""
        try:
            status = read_json(self.manifest_path, "manifest").get("status")
        except (UserInputError, OSError, AttributeError):
            return False
        return (status == "running" and not (train_dir(self.path) / LAST).exists()
                and (held or not is_locked(self.path)))

    def writable(self) -> bool:
        """Whether this process may write here (``os.access``; a read-only mount says no)."""
        return os.access(self.path, os.W_OK | os.X_OK)

    def clear(self) -> None:
        """Remove every file and folder of the run but the lock file (``--overwrite``: the new run
        replaces the old one whole). Call it holding the lock, on a run directory only."""
        for p in self.path.iterdir():
            if p.name == LOCK_NAME:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    # -- manifest -----------------------------------------------------------------------------

    def manifest(self) -> Manifest:
        if not self.path.is_dir():
            raise UserInputError(f"{self.path} is not a run directory")
        if not self.manifest_path.exists():
            raise UserInputError(f"{self.path} has no {MANIFEST}; is it a wnconvert run directory?")
        return Manifest.from_dict(read_json(self.manifest_path, "manifest"), f"{self.path}/{MANIFEST}")

    def write_manifest(self, manifest: Manifest) -> None:
        write_json(self.manifest_path, manifest.to_dict())

    def finish(self, manifest: Manifest) -> Manifest:
        """Mark the run complete and record the sha256 of every artifact present."""
        manifest.status = "complete"
        manifest.artifacts = {p.name: sha256(p) for p in sorted(self.path.iterdir())
                              if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
        self.write_manifest(manifest)
        return manifest

    def check_artifacts(self, manifest: Manifest) -> None:
        """Raise ParityError naming the first artifact recorded in the manifest that is missing or
        whose sha256 differs from the recorded one (a file replaced or edited since)."""
        for name, digest in sorted(manifest.artifacts.items()):
            if not isinstance(name, str) or Path(name).name != name or not isinstance(digest, str):
                raise UserInputError(f"{self.path}/{MANIFEST} records an artifact {name!r} that is "
                                     "not a file name of the run")
            path = self.path / name
            if not path.is_file():
                raise ParityError(f"{path} is recorded in {MANIFEST} but missing")
            if sha256(path) != digest:
                raise ParityError(f"{path} does not match the sha256 recorded in {MANIFEST} "
                                  "(changed after the run wrote it)")

    def record(self, manifest: Manifest, *names: str) -> None:
        """Re-record the sha256 of ``names`` (files this command rewrote) in the manifest."""
        for name in names:
            manifest.artifacts[name] = sha256(self.path / name)
        self.write_manifest(manifest)

    # -- report.json --------------------------------------------------------------------------

    def report(self) -> dict:
        report = read_json(self.report_path, "report") if self.report_path.exists() else {}
        if not isinstance(report, dict):
            raise UserInputError(f"{self.report_path} is not a JSON object")
        return report

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
            try:
                save_file(state, str(tmp))
            except SafetensorError as e:  # a full disk, say: atomic_path makes it one line
                raise OSError(str(e)) from None

    def load(self) -> tuple[Manifest, nn.Module, Preprocess]:
        """The manifest, the reparametrized model with its checkpoint loaded, its preprocessing.
        For an ``--act-bits`` run: the float network (see models/train/act_run.py); :meth:`load_qat`
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


def writes_run(fn: Callable) -> Callable:
    """Decorate a library function ``fn(run_dir, ...)`` that writes into an existing run
    directory: it runs holding the directory's write lock."""

    @functools.wraps(fn)
    def wrapper(run_dir, *args, **kwargs):
        with RunDir(run_dir).writing():
            return fn(run_dir, *args, **kwargs)

    return wrapper
