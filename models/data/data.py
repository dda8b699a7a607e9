"""Datasets for fine-tuning and evaluation from a data spec and a preprocessing.

Data specs live in :mod:`.dataspec`, preprocessing in :mod:`.preprocess` (both re-exported here),
the dataset readers in :mod:`.datasets` and GPU JPEG decoding in :mod:`.gpu_decode`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset, Subset

from . import datasets as ds
from .dataspec import (  # noqa: F401 (re-exported)
    FASHION_MNIST_DEFAULT_PATH,
    KINDS,
    SYNTHETIC_DEFAULT_CLASSES,
    DataBundle,
    DataError,
    DataSpec,
    as_spec,
    parse_data_spec,
)
from .encoded import EncodedImageDataset
from .gpu_decode import GpuBatchTransform
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, is_int  # noqa: F401 (re-exported)


def default_preprocess(
    spec: DataSpec | str,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Preprocess:
    """Usual preprocessing for a spec; mean/std default to those of the ImageNet-pretrained weights."""
    spec = as_spec(spec)
    if image_size is not None and (not is_int(image_size) or image_size < 1):
        raise DataError(f"image size must be a positive integer, got {image_size!r}")
    if spec.kind == "imagefolder":
        size = 224 if image_size is None else int(image_size)
        resize = int(round(size * 256 / 224))  # keep torchvision's ImageNet eval ratio
    else:
        # Small sources are resized as a whole; synthetic tensors are generated at the final size.
        size = (32 if spec.kind in ("fashion-mnist", "cifar10", "cifar100") else 224)
        size = size if image_size is None else int(image_size)
        resize = size
    return Preprocess(
        image_size=size,
        resize_size=resize,
        mean=IMAGENET_MEAN if mean is None else mean,  # type: ignore[arg-type]
        std=IMAGENET_STD if std is None else std,  # type: ignore[arg-type]
        grayscale_to_rgb=spec.kind == "fashion-mnist",
    )


def _check_limit(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_seed(seed: Any) -> int:
    if not is_int(seed) or seed < 0:
        raise DataError(f"data seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def build_data(
    spec: DataSpec | str,
    preprocess: Preprocess,
    *,
    limit_train: int | None = None,
    limit_val: int | None = None,
    download: bool = False,
    train_augment: bool = True,
    seed: int = 0,
    gpu_decode: bool = False,
) -> DataBundle:
    """Train and val datasets yielding (float32 3xHxW tensor, int label).

    ``limit_*`` keep a seeded random subset (classes stay mixed); for ``synthetic`` they set the size.
    ``gpu_decode`` (imagefolder only): the datasets yield (encoded bytes, label, path) instead and
    ``bundle.gpu_transform`` decodes, augments and normalizes whole batches on the training device.
    """
    spec = as_spec(spec)
    limit_train = _check_limit("limit_train", limit_train)
    limit_val = _check_limit("limit_val", limit_val)
    seed = _check_seed(seed)
    if gpu_decode:  # same folders, subsets and preprocessing; decoding moves to the device
        return build_encoded_data(spec, preprocess, limit_train=limit_train, limit_val=limit_val,
                                  train_augment=train_augment, seed=seed)
    small = ds.is_small(spec, preprocess)
    eval_tf = preprocess.eval_transform()
    train_tf = preprocess.train_transform(small) if train_augment else eval_tf
    size = preprocess.image_size
    train, classes = ds.load_split(
        spec, "train", train_tf, image_size=size, limit=limit_train, seed=seed, download=download
    )
    val, val_classes = ds.load_split(
        spec, "val", eval_tf, image_size=size, limit=limit_val, seed=seed, download=download
    )
    if val_classes != classes:
        raise DataError(ds.describe_class_mismatch(spec, classes, val_classes))
    return DataBundle(train=train, val=val, num_classes=len(classes), classes=classes, small_images=small)


def eval_arrays(
    spec: DataSpec | str, preprocess: Preprocess, limit: int | None = None, seed: int = 0,
    split: str = "val",
) -> tuple[np.ndarray, np.ndarray]:
    """The validation images build_data(..., limit_val=limit, seed=seed) would use, preprocessed as
    float32 N,3,H,W, with int64 labels (for evaluating ONNX files in onnxruntime). ``split="train"``
    gives training images the same way, without augmentation (for calibrating quantizers)."""
    spec = as_spec(spec)
    limit = _check_limit("limit", limit)
    seed = _check_seed(seed)
    if split not in ("train", "val"):
        raise DataError(f"unknown split {split!r}; choose train or val")
    if spec.kind in ds.ARRAY_KINDS:
        # Same arrays and subset as build_data's val, but preprocessed in one vectorized pass.
        images, labels, _ = ds.load_arrays(spec, split, download=False)
        keep = ds.subset_indices(len(labels), limit, seed, split)
        if keep is not None:
            images, labels = images[keep], labels[keep]
        return preprocess.apply_numpy(images), labels.astype(np.int64)
    val, _ = ds.load_split(
        spec, split, preprocess.eval_transform(),
        image_size=preprocess.image_size, limit=limit, seed=seed, download=False,
    )  # fmt: skip
    xs, ys = [], []
    for i in range(len(val)):  # type: ignore[arg-type]
        x, y = val[i]
        xs.append(x.numpy())
        ys.append(y)
    if not xs:
        raise DataError(f"{spec}: the {'validation' if split == 'val' else 'training'} set is empty")
    return np.stack(xs).astype(np.float32, copy=False), np.asarray(ys, dtype=np.int64)


def _folder_samples(dataset: Dataset) -> list[tuple[str, int]]:
    if isinstance(dataset, Subset):
        return [dataset.dataset.samples[i] for i in dataset.indices]  # type: ignore[attr-defined]
    return list(dataset.samples)  # type: ignore[attr-defined]


def build_encoded_data(spec: DataSpec, preprocess: Preprocess, *, limit_train: int | None,
                       limit_val: int | None, train_augment: bool, seed: int) -> DataBundle:
    """The bundle build_data(..., gpu_decode=True) returns: same files, classes and seeded subsets
    as the PIL path (the folders are read by the same code), encoded-byte datasets, and the
    transform train() runs on the device."""
    if spec.kind != "imagefolder":
        raise DataError(f"GPU decoding reads JPEG files and needs an imagefolder data spec, not {spec}")
    size = preprocess.image_size
    train, classes = ds.load_split(spec, "train", None, image_size=size,  # type: ignore[arg-type]
                                   limit=limit_train, seed=seed, download=False)
    val, val_classes = ds.load_split(spec, "val", None, image_size=size,  # type: ignore[arg-type]
                                     limit=limit_val, seed=seed, download=False)
    if val_classes != classes:
        raise DataError(ds.describe_class_mismatch(spec, classes, val_classes))
    return DataBundle(train=EncodedImageDataset(_folder_samples(train)),
                      val=EncodedImageDataset(_folder_samples(val)), num_classes=len(classes),
                      classes=classes, small_images=False,
                      gpu_transform=GpuBatchTransform(preprocess, augment=train_augment))
