"""Preprocessing: how an image becomes the model input.

:class:`Preprocess` is recorded in every run's manifest so the exported ONNX file can be fed the same
numbers later, with or without torch: :meth:`Preprocess.apply_numpy` (numpy + PIL) computes exactly
what :meth:`Preprocess.eval_transform` computes, because both run the same code path.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .dataspec import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Resampling filters we can reproduce outside torch: both transforms resize through PIL.
_PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Chunk size for batched numpy preprocessing (bounds peak memory of eval_arrays).
_NUMPY_CHUNK = 2048


def is_int(value: Any) -> bool:
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
            if not is_int(value) or value < 1:
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
        if resized_size(batch.shape[1], batch.shape[2], self.resize_size) != batch.shape[1:3]:
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


def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Output size when the shorter side goes to ``size`` (same rule as torchvision's Resize(int))."""
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def _resize_shorter(image: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """HxWxC uint8: shorter side -> ``size`` with PIL, as torchvision's Resize does on PIL images."""
    h, w, c = image.shape
    new_h, new_w = resized_size(h, w, size)
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
        new_h, new_w = resized_size(h, w, size)
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
