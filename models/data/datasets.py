"""Dataset readers behind :func:`wnconvert.models.data.data.build_data`.

Fashion-MNIST and CIFAR are held in memory as one uint8 array per split and served as PIL images
through the transform; ImageFolder trees go through torchvision; synthetic data is generated on the fly.
Every problem a user can cause (missing or corrupt files, empty folders) is a one-line DataError.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from .dataspec import FASHION_MNIST_DEFAULT_PATH, DataError, DataSpec
from .preprocess import Preprocess

ARRAY_KINDS = ("fashion-mnist", "cifar10", "cifar100")
SYNTHETIC_SIZES = {"train": 1024, "val": 256}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_FASHION_FILES = {"train": "train", "val": "t10k"}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
# Independent random streams per split, so the train and val subsets do not depend on each other.
_STREAMS = {"train": 0, "val": 1}

Transform = Callable[[Any], torch.Tensor]


def is_small(spec: DataSpec, preprocess: Preprocess) -> bool:
    """Sources of at most 64 px get the crop-with-padding augmentation instead of RandomResizedCrop."""
    if spec.kind == "synthetic":
        return preprocess.image_size <= 64
    return spec.kind in ARRAY_KINDS


def subset_indices(n: int, limit: int | None, seed: int, split: str) -> np.ndarray | None:
    """Sorted indices of a seeded random subset of ``limit`` out of ``n`` (None: keep all)."""
    if limit is None or limit >= n:
        return None
    rng = np.random.default_rng([seed, _STREAMS[split]])
    return np.sort(rng.permutation(n)[:limit])


def load_split(
    spec: DataSpec,
    split: str,
    transform: Transform,
    *,
    image_size: int,
    limit: int | None,
    seed: int,
    download: bool,
) -> tuple[Dataset, list[str]]:
    """One split ("train" or "val") of a spec, limited to a seeded subset; returns (dataset, classes).

    Synthetic data ignores ``transform``: it is generated normalized at ``image_size``."""
    if spec.kind == "synthetic":
        size = SYNTHETIC_SIZES[split] if limit is None else limit
        classes = [f"class_{i:04d}" for i in range(spec.synthetic_classes)]
        return SyntheticDataset(size, len(classes), image_size, seed, split), classes
    if spec.kind in ARRAY_KINDS:
        images, labels, classes = load_arrays(spec, split, download=download)
        dataset: Dataset = ArrayImageDataset(images, labels, transform)
        n = len(labels)
    else:
        folder = _image_folder(spec, split, transform)
        dataset, classes, n = folder, list(folder.classes), len(folder)
    keep = subset_indices(n, limit, seed, split)
    if keep is not None:
        if isinstance(dataset, ArrayImageDataset):
            dataset = dataset.subset(keep)  # slice the arrays: cheaper than a Subset wrapper
        else:
            dataset = Subset(dataset, keep.tolist())
    return dataset, classes


def describe_class_mismatch(spec: DataSpec, train: list[str], val: list[str]) -> str:
    missing = [c for c in train if c not in val]
    extra = [c for c in val if c not in train]

    def show(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

    parts = [f"missing in val/: {show(missing)}"] if missing else []
    parts += [f"only in val/: {show(extra)}"] if extra else []
    return f"{spec}: val/ classes differ from train/ classes; " + "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# In-memory image arrays (Fashion-MNIST, CIFAR)


class ArrayImageDataset(Dataset):
    """uint8 images (N,H,W or N,H,W,C) + int64 labels; items are (transform(PIL image), int label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch, used by DataLoader: preprocess the batch at once when the transform can
        (Preprocess's transforms can), still returning samples so any collate_fn works."""
        batch = getattr(self.transform, "batch", None)
        if batch is None:
            return [self[i] for i in indices]
        images = batch(self.images[np.asarray(indices, dtype=np.int64)])
        return list(zip(images.unbind(0), self.labels[indices].tolist()))

    def subset(self, indices: np.ndarray) -> ArrayImageDataset:
        return ArrayImageDataset(self.images[indices], self.labels[indices], self.transform)


def load_arrays(spec: DataSpec, split: str, *, download: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8, labels int64, class names) of one split of an in-memory dataset."""
    if spec.kind == "fashion-mnist":
        return (*read_fashion_mnist(Path(spec.path or FASHION_MNIST_DEFAULT_PATH).expanduser(), split),
                list(FASHION_MNIST_CLASSES))  # fmt: skip
    return _load_cifar(spec, split, download=download)


def read_fashion_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N,28,28 uint8) and labels (N int64) of the "train" or "val" (t10k) split."""
    if not root.is_dir():
        hint = (" (install the Debian package dataset-fashion-mnist, or pass fashion-mnist:PATH)"
                if str(root) == FASHION_MNIST_DEFAULT_PATH else "")  # fmt: skip
        raise DataError(f"fashion-mnist: directory {root} does not exist{hint}")
    prefix = _FASHION_FILES[split]
    images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"), _IDX_IMAGES_MAGIC)
    labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"), _IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"fashion-mnist: {root} has {len(images)} {prefix} images but {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"fashion-mnist: the {prefix} split in {root} is empty")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"fashion-mnist: {prefix} labels in {root} go up to {labels.max()}, expected 0-9")
    return images, labels.astype(np.int64)


def _find_idx(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"fashion-mnist: {root} has no {name}.gz (nor {name})")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an idx file (optionally gzipped): big-endian magic, one uint32 per dimension, raw bytes."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = bytearray(f.read())  # writable, so torch.from_numpy on slices does not warn
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {err}") from None
    if len(raw) < 4:
        raise DataError(f"{path} is not an idx file (only {len(raw)} bytes)")
    (found,) = struct.unpack_from(">I", raw, 0)
    if found != magic:
        raise DataError(f"{path} is not the expected idx file (magic number {found}, expected {magic})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header")
    dims = struct.unpack_from(f">{ndim}I", raw, 4)
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes but its header announces {expected} "
            f"(shape {'x'.join(map(str, dims))}): truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_cifar(spec: DataSpec, split: str, *, download: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, name = (CIFAR10, "CIFAR-10") if spec.kind == "cifar10" else (CIFAR100, "CIFAR-100")
    root = Path(spec.path or "").expanduser()
    if not download and not root.is_dir():
        raise DataError(f"{spec.kind}: {root} does not exist; pass --download to fetch {name} there")
    try:
        data = cls(root=str(root), train=split == "train", download=download)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        raise DataError(
            f"{spec.kind}: no intact {name} under {root} (expected {root / cls.base_folder}); "
            "pass --download to fetch it"
        ) from None
    except (OSError, ValueError) as err:  # network failures are URLError (an OSError)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{spec.kind}: could not download {name} into {root}: {reason}") from None
    if len(data.targets) == 0:
        raise DataError(f"{spec.kind}: the {split} split under {root} is empty")
    return np.ascontiguousarray(data.data), np.asarray(data.targets, dtype=np.int64), list(data.classes)


# --------------------------------------------------------------------------------------------------
# ImageFolder trees (PATH/train/<class>/<image>, PATH/val/<class>/<image>)


def _load_rgb(path: str) -> Image.Image:
    """ImageFolder loader that names the file when it cannot be decoded."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image {path}: {err}") from None


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def scan_image_tree(folder: Path, is_image: Callable[[str], bool]) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and ``(path, class index)`` samples of ``folder/<class>/**/<image>``, in
    torchvision's ImageFolder order.

    Unlike torchvision's walk, which follows every directory link and loops forever (or until the
    path gets too long) on a link to an ancestor, symbolic links are followed only while they stay
    inside ``folder`` (itself resolved, so ``PATH/train`` may be a link to a mounted disk) and each
    real directory is read once: a link that leaves the tree, or leads back to a directory already
    read, is a DataError naming it, so no image is silently counted twice."""
    top = os.path.realpath(folder)
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DataError(f"imagefolder: {folder} has no class folders")
    seen: set[str] = set()
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        found: list[tuple[str, list[str]]] = []
        stack = [os.path.join(folder, name)]
        while stack:
            d = stack.pop()
            real = os.path.realpath(d)
            if not _inside(real, top):
                raise DataError(f"imagefolder: {d} links outside {folder} (to {real}); "
                                "place or mount the images inside the tree")
            if real in seen:
                raise DataError(f"imagefolder: {d} leads back to {real}, already read "
                                "(a symbolic link loop or a second path to one folder)")
            seen.add(real)
            files = []
            for entry in os.scandir(d):
                if entry.is_dir():
                    stack.append(entry.path)
                elif entry.is_file() and is_image(entry.path):
                    if not _inside(os.path.realpath(entry.path), top):
                        raise DataError(f"imagefolder: {entry.path} links outside {folder}; "
                                        "place or mount the images inside the tree")
                    files.append(entry.name)
            found.append((d, sorted(files)))
        images = [(os.path.join(d, f), index) for d, files in sorted(found) for f in files]
        if not images:
            raise DataError(f"imagefolder: {folder}/{name} holds no images")
        samples += images
    return classes, samples


def _is_image(path: str) -> bool:
    return has_file_allowed_extension(path, IMG_EXTENSIONS)


class _ImageTree(ImageFolder):
    """torchvision's ImageFolder over the classes and samples of :func:`scan_image_tree`."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        self._scanned = scan_image_tree(Path(directory), _is_image)
        return self._scanned[0], {c: i for i, c in enumerate(self._scanned[0])}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,  # type: ignore[override]
                     allow_empty=False) -> list[tuple[str, int]]:
        return self._scanned[1]


def _image_folder(spec: DataSpec, split: str, transform: Transform) -> Dataset:
    root = Path(spec.path or "").expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder: {root} is not a directory")
    folder = root / split
    if not folder.is_dir():
        raise DataError(
            f"imagefolder: {root} has no {split}/ folder (expected {root}/train/<class>/<image> "
            f"and {root}/val/<class>/<image>)"
        )
    return _ImageTree(str(folder), transform=transform, loader=_load_rgb)


# --------------------------------------------------------------------------------------------------
# Synthetic data


class SyntheticDataset(Dataset):
    """Deterministic, already normalized 3xSxS float tensors with random labels.

    Each image is a class-specific coarse pattern (shared by train and val) plus per-image noise, so a
    model can actually learn something and smoke tests can check that accuracy rises above chance.
    """

    def __init__(self, size: int, num_classes: int, image_size: int, seed: int, split: str) -> None:
        self.size, self.num_classes, self.image_size = size, num_classes, image_size
        self.seed, self.stream = seed, _STREAMS[split]
        self.labels = np.random.default_rng([seed, self.stream, 0]).integers(0, num_classes, size)
        self._upsample = np.arange(image_size) * 4 // image_size  # 4x4 pattern -> SxS, nearest

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        label = int(self.labels[index])
        s = self.image_size
        # The pattern's stream (2) is shared by both splits; the noise's is per split and image.
        pattern = np.random.default_rng([self.seed, 2, label]).standard_normal((3, 4, 4), np.float32)
        noise = np.random.default_rng([self.seed, self.stream, 1, index]).standard_normal((3, s, s), np.float32)
        image = 0.6 * pattern[:, self._upsample][:, :, self._upsample] + 0.8 * noise  # unit variance
        return torch.from_numpy(image), label
