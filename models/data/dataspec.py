"""Data specs: where the images come from (``fashion-mnist``, ``imagefolder:/data/imagenet``, ...),
the error every data problem raises, and the bundle :func:`wnconvert.models.data.data.build_data` returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...convert.errors import UserInputError


class DataError(UserInputError):
    """A data spec, dataset on disk or preprocessing option is unusable (one-line message)."""

    def __init__(self, message: str = "") -> None:
        # Raised in a DataLoader worker, it is re-raised in the main process as
        # DataError("Caught DataError in DataLoader worker process N.\nOriginal Traceback ...
        # \n...DataError: MESSAGE"): keep the worker's own one-line MESSAGE (it names the file).
        if message.startswith("Caught DataError"):
            message = message.rstrip().rsplit("DataError: ", 1)[-1]
        super().__init__(message)


KINDS = ("imagefolder", "cifar10", "cifar100", "fashion-mnist", "synthetic")
_PATH_REQUIRED = ("imagefolder", "cifar10", "cifar100")
FASHION_MNIST_DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
SYNTHETIC_DEFAULT_CLASSES = 1000


@dataclass(frozen=True)
class DataSpec:
    """Where the images come from. ``path`` holds the class count for ``synthetic``."""

    kind: str
    path: str | None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"unknown data kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise DataError(f"data spec {self.kind}: empty path")
        if self.kind in _PATH_REQUIRED and self.path is None:
            raise DataError(f"data spec {self.kind} needs a path, e.g. '{self.kind}:/data/{self.kind}'")
        if self.kind == "synthetic" and self.path is not None:
            try:
                classes = int(self.path)
            except ValueError:
                classes = 0
            if classes < 2 or str(classes) != self.path:
                raise DataError(
                    f"data spec synthetic:{self.path}: the class count must be an integer >= 2"
                )

    @property
    def synthetic_classes(self) -> int:
        return int(self.path) if self.path is not None else SYNTHETIC_DEFAULT_CLASSES

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_data_spec(spec: str) -> DataSpec:
    """``KIND`` or ``KIND:PATH`` (split at the first colon) -> DataSpec."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec; valid kinds: {', '.join(KINDS)}")
    kind, sep, path = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r} in {spec!r}; valid kinds: {', '.join(KINDS)}")
    if sep and not path.strip():
        raise DataError(f"data spec {spec!r} has an empty path after ':'")
    if kind == "synthetic" and sep:
        path = path.strip()
        if path.isdigit():
            path = str(int(path))  # "synthetic:010" -> "synthetic:10"
    return DataSpec(kind, path if sep else None)


def as_spec(spec: DataSpec | str) -> DataSpec:
    if isinstance(spec, DataSpec):
        return spec
    return parse_data_spec(spec)


@dataclass
class DataBundle:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    num_classes: int
    classes: list[str]
    small_images: bool
    # Set by build_data(..., gpu_decode=True): train/val then yield encoded file bytes and train()
    # decodes and augments each batch on the device with this transform (models/data/gpu_decode.py).
    gpu_transform: Any = None  # models.data.gpu_decode.GpuBatchTransform
