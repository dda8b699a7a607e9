"""Data specs, preprocessing and datasets for fine-tuning.

A data spec is a short string (``fashion-mnist``, ``imagefolder:/data/imagenet``, ...) naming where the
images come from. :class:`Preprocess` describes how an image becomes the float tensor the model eats; it
is recorded in every run's manifest so the exported ONNX file can be fed the same numbers later, with or
without torch: :meth:`Preprocess.apply_numpy` (numpy + PIL) computes exactly what
:meth:`Preprocess.eval_transform` computes, because both run the same code path.

The dataset readers themselves live in :mod:`wnconvert.models.datasets`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..convert.errors import UserInputError

if TYPE_CHECKING:
    from .gpu_decode import GpuBatchTransform


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
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Resampling filters we can reproduce outside torch: both transforms resize through PIL.
_PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Chunk size for batched numpy preprocessing (bounds peak memory of eval_arrays).
_NUMPY_CHUNK = 2048


# --------------------------------------------------------------------------------------------------
# Preprocessing


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise DataError(f"preprocess {name} must be three numbers, got {value!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise DataError(f"preprocess {name} must be three finite numbers, got {value!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model input; recorded in every run's manifest.json.

    Eval: resize the shorter side to ``resize_size`` (PIL, ``interpolation``), center-crop
    ``image_size``, scale to [0, 1], repeat a single channel to three, normalize with ``mean``/``std``.
    ``grayscale_to_rgb`` records that the source images have one channel (they are repeated to three);
    1-channel input is accepted whatever its value.
    """

    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grayscale_to_rgb: bool = False
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("image_size", "resize_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise DataError(f"preprocess {name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.resize_size < self.image_size:
            raise DataError(
                f"preprocess resize_size ({self.resize_size}) must be >= image_size ({self.image_size})"
            )
        object.__setattr__(self, "mean", _triple("mean", self.mean))
        std = _triple("std", self.std)
        if min(std) <= 0:
            raise DataError(f"preprocess std must be positive, got {self.std!r}")
        object.__setattr__(self, "std", std)
        if not isinstance(self.grayscale_to_rgb, bool):
            raise DataError(f"preprocess grayscale_to_rgb must be true or false, got {self.grayscale_to_rgb!r}")
        if self.interpolation not in _PIL_FILTERS:
            raise DataError(
                f"preprocess interpolation must be one of {', '.join(_PIL_FILTERS)}, got {self.interpolation!r}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        if not isinstance(d, dict):
            raise DataError(f"preprocess must be a mapping, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in d]
        if missing:
            raise DataError(f"preprocess is missing {', '.join(missing)}")
        # Unknown keys are ignored so manifests written by newer versions stay readable.
        return cls(**{n: d[n] for n in names if n in d})

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image (or HxW / HxWxC uint8 array) -> normalized float32 3xHxW tensor."""
        return _EvalTransform(self)

    def train_transform(self, small_images: bool) -> Callable[[Any], torch.Tensor]:
        """Random augmentation for training.

        ``small_images`` (sources of at most 64 px such as Fashion-MNIST, CIFAR): resize to
        ``image_size``, random crop with ``image_size // 8`` zero padding, horizontal flip, as tensor
        ops over a whole batch where the dataset allows it (several times cheaper per image than the
        PIL transform chain, which matters on few cores). Otherwise: RandomResizedCrop(image_size) +
        RandomHorizontalFlip on PIL images.
        """
        if small_images:
            return _SmallTrainTransform(self)
        from torchvision.transforms import InterpolationMode, v2

        return v2.Compose([
            _ToRGBPIL(),
            v2.RandomResizedCrop(
                self.image_size, interpolation=InterpolationMode(self.interpolation), antialias=True
            ),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(self.mean), list(self.std)),
        ])

    def apply_numpy(self, images_uint8: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Eval preprocessing of a batch without torch -> float32 N,3,H,W.

        Accepts an N,H,W (grayscale) or N,H,W,C (C = 1 or 3) uint8 array, or a sequence of HxW /
        HxWxC uint8 images of possibly different sizes. Gives the same numbers as eval_transform.
        """
        if not isinstance(images_uint8, np.ndarray):
            return self._normalize_chunks([self._resize_crop(_as_hwc(img)) for img in images_uint8])
        batch = images_uint8[..., None] if images_uint8.ndim == 3 else images_uint8
        if batch.ndim != 4:
            raise DataError(f"apply_numpy expects N,H,W or N,H,W,C images, got shape {batch.shape}")
        if len(batch) == 0:
            return np.empty((0, 3, self.image_size, self.image_size), dtype=np.float32)
        _check_hwc(batch[0])
        if _resized_size(batch.shape[1], batch.shape[2], self.resize_size) != batch.shape[1:3]:
            # Pillow's resampling is the reference (torchvision resizes PIL images with it) and its
            # exact integer arithmetic and pass order vary between versions, so resize through it,
            # image by image (about 20 us for a 28x28 image); everything else is vectorized.
            return self._normalize_chunks([self._resize_crop(img) for img in batch])
        return self._normalize_chunks(_center_crop(batch, self.image_size))

    # -- shared eval path ------------------------------------------------------------------------

    def _resize_crop(self, image: np.ndarray) -> np.ndarray:
        """HxWxC uint8 -> image_size x image_size x C uint8 (shorter side resize, center crop)."""
        resized = _resize_shorter(_check_hwc(image), self.resize_size, self.interpolation)
        return _center_crop(resized[None], self.image_size)[0]

    def _normalize_chunks(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        n = len(images)
        out = np.empty((n, 3, self.image_size, self.image_size), dtype=np.float32)
        for start in range(0, n, _NUMPY_CHUNK):
            chunk = np.asarray(images[start : start + _NUMPY_CHUNK])
            out[start : start + len(chunk)] = _normalize(chunk, self.mean, self.std)
        return out


def _check_hwc(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] not in (1, 3) or 0 in image.shape:
        raise DataError(f"images must be HxW, HxWx1 or HxWx3, got shape {image.shape}")
    return image


def _as_hwc(image: Any) -> np.ndarray:
    """PIL image or HxW / HxWxC uint8 array -> HxWxC uint8 array with C in (1, 3)."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        image = np.asarray(image)
    image = np.asarray(image)
    return _check_hwc(image[..., None] if image.ndim == 2 else image)


def _resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Output size when the shorter side goes to ``size`` (same rule as torchvision's Resize(int))."""
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def _resize_shorter(image: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """HxWxC uint8: shorter side -> ``size`` with PIL, as torchvision's Resize does on PIL images."""
    h, w, c = image.shape
    new_h, new_w = _resized_size(h, w, size)
    if (new_h, new_w) == (h, w):
        return image
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    resized = np.asarray(pil.resize((new_w, new_h), _PIL_FILTERS[interpolation]))
    return resized.reshape(new_h, new_w, c)


def _center_crop(batch: np.ndarray, size: int) -> np.ndarray:
    """N,H,W,C -> N,size,size,C; anchors rounded like torchvision's CenterCrop."""
    h, w = batch.shape[1:3]
    if h < size or w < size:
        raise DataError(f"cannot center-crop {size}x{size} from a {h}x{w} image")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return batch[:, top : top + size, left : left + size]


def _normalize(batch: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """N,H,W,C uint8 -> N,3,H,W float32, with the same float32 operations as torchvision's
    ToDtype(scale=True) + Normalize, so results agree to the last bit."""
    x = batch.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1.0 / 255)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - m) / s)  # a single channel broadcasts to three


# The transforms below also offer ``batch(images N,H,W[,C] uint8) -> N,3,S,S``, which in-memory
# datasets use to preprocess a whole DataLoader batch at once (see ArrayImageDataset.__getitems__).


class _EvalTransform:
    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, image: Any) -> torch.Tensor:
        p = self.preprocess
        cropped = p._resize_crop(_as_hwc(image))
        return torch.from_numpy(_normalize(cropped[None], p.mean, p.std)[0])

    def batch(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.preprocess.apply_numpy(images))


class _SmallTrainTransform:
    """Resize to image_size, random crop with image_size // 8 zero padding, random horizontal flip.

    Runs as tensor ops on 0-255 pixel values, a whole batch at a time when possible: the PIL transform
    chain costs about 4x more per image, too much for a 2-core machine feeding a GPU. The resize is
    torch's antialiased interpolation rounded to whole grey levels, within one level of PIL's (only
    eval must match PIL exactly). Randomness comes from torch's generator, which DataLoader seeds per
    worker (numpy's global generator would repeat the same crops in every forked worker).
    """

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess
        self.padding = preprocess.image_size // 8

    def __call__(self, image: Any) -> torch.Tensor:
        return self.batch(_as_hwc(image)[None])[0]

    def batch(self, images: np.ndarray) -> torch.Tensor:
        p, pad, size = self.preprocess, self.padding, self.preprocess.image_size
        if not images.flags.writeable:
            images = images.copy()  # torch.from_numpy warns on read-only arrays
        x = torch.from_numpy(images)
        x = (x.unsqueeze(-1) if x.ndim == 3 else x).permute(0, 3, 1, 2).float()  # N,C,H,W
        n, c, h, w = x.shape
        new_h, new_w = _resized_size(h, w, size)
        if (new_h, new_w) != (h, w):
            x = torch.nn.functional.interpolate(
                x, (new_h, new_w), mode=p.interpolation, antialias=True, align_corners=False
            ).round_().clamp_(0, 255)
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        # One crop offset and flip per image, applied with a single gather.
        top = torch.randint(new_h + 2 * pad - size + 1, (n, 1))
        left = torch.randint(new_w + 2 * pad - size + 1, (n, 1))
        steps = torch.arange(size)
        cols = torch.where(torch.rand(n, 1) < 0.5, size - 1 - steps, steps) + left
        rows = steps + top
        x = x[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]  # fmt: skip
        mean = torch.tensor(p.mean).view(1, 3, 1, 1)
        std = torch.tensor(p.std).view(1, 3, 1, 1)
        return ((x.mul_(1.0 / 255) - mean) / std).contiguous()  # one channel broadcasts to three


class _ToRGBPIL:
    """Any image (PIL or uint8 array) -> RGB PIL image, for the torchvision transform chain."""

    def __call__(self, image: Any) -> Image.Image:
        if not isinstance(image, Image.Image):
            hwc = _as_hwc(image)
            image = Image.fromarray(hwc[..., 0] if hwc.shape[2] == 1 else hwc)
        return image if image.mode == "RGB" else image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# Data specs


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


def _as_spec(spec: DataSpec | str) -> DataSpec:
    if isinstance(spec, DataSpec):
        return spec
    return parse_data_spec(spec)


def default_preprocess(
    spec: DataSpec | str,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Preprocess:
    """Usual preprocessing for a spec; mean/std default to those of the ImageNet-pretrained weights."""
    spec = _as_spec(spec)
    if image_size is not None and (not _is_int(image_size) or image_size < 1):
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


# --------------------------------------------------------------------------------------------------
# Building datasets


@dataclass
class DataBundle:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    num_classes: int
    classes: list[str]
    small_images: bool
    # Set by build_data(..., gpu_decode=True): train/val then yield encoded file bytes and train()
    # decodes and augments each batch on the device with this transform (models/gpu_decode.py).
    gpu_transform: GpuBatchTransform | None = None


def _check_limit(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_seed(seed: Any) -> int:
    if not _is_int(seed) or seed < 0:
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
    from . import datasets as ds  # datasets.py imports DataError from here

    spec = _as_spec(spec)
    limit_train = _check_limit("limit_train", limit_train)
    limit_val = _check_limit("limit_val", limit_val)
    seed = _check_seed(seed)
    if gpu_decode:  # same folders, subsets and preprocessing; decoding moves to the device
        from .gpu_decode import build_encoded_data

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
    from . import datasets as ds

    spec = _as_spec(spec)
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
