"""Encoded images: what the DataLoader workers produce for GPU decoding (file bytes, batched
into one buffer), and which of them nvjpeg can decode."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import read_file

from .dataspec import DataError

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every call
# (thousands per epoch here). The ops still work; silence just that message.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

# SOF markers nvjpeg decodes: baseline, extended and progressive Huffman. Arithmetic-coded,
# lossless and hierarchical JPEGs go to the CPU decoder.
_NVJPEG_SOF = (0xC0, 0xC1, 0xC2)
_NO_LENGTH_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-7: no length field


def nvjpeg_decodable(data: Tensor) -> bool:
    """True for an 8-bit, 3-component Huffman JPEG: the files the GPU decodes.

    Everything else goes to the CPU decoder: CMYK/YCCK JPEGs (4 components), which nvjpeg does
    not convert to RGB the way libjpeg/PIL do; grayscale ones (1 component), whose gray-to-RGB
    output from nvjpeg is unverified here (together about 1-2% of ImageNet); other formats (PNG,
    ...) and files that are not images at all (the CPU decoder names them).
    Walks the marker segments up to the frame header: a few reads per file, done in the workers.
    """
    b = memoryview(data.numpy()) if data.numel() else memoryview(b"")
    n = len(b)
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return False
    i = 2
    while i + 4 <= n:
        if b[i] != 0xFF:
            return False
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _NO_LENGTH_MARKERS:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return False
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT/JPG/DAC)
            if i + 10 > n:
                return False
            precision, components = b[i + 4], b[i + 9]
            return marker in _NVJPEG_SOF and precision == 8 and components == 3
        i += 2 + ((b[i + 2] << 8) | b[i + 3])
    return False


class EncodedImageDataset(Dataset):
    """ImageFolder samples as ``(encoded file bytes: 1-D uint8 tensor, label, path)``.

    Reading a file is all a worker does, so a few workers feed any GPU. The path travels with the
    bytes so that a file that cannot be decoded on the device is named in the error.
    """

    def __init__(self, samples: Sequence[tuple[str, int]]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str]:
        path, label = self.samples[index]
        try:
            data = read_file(path)
        except RuntimeError as err:
            raise DataError(f"cannot read image {path}: {reason(err)}") from None
        return data, label, path


@dataclass
class EncodedBatch:
    """A batch of encoded images stored back to back in one uint8 buffer.

    One buffer means one shared-memory segment per batch between worker and main process (instead
    of one per image). A plain class, not a tuple: DataLoader's pin_memory leaves it alone, as
    nvjpeg copies the bitstreams itself.
    """

    buffer: Tensor
    sizes: list[int]
    paths: list[str]
    on_gpu: list[bool]  # nvjpeg_decodable() of each image, computed in the worker

    def __len__(self) -> int:
        return len(self.sizes)

    def images(self) -> list[Tensor]:
        return list(torch.split(self.buffer, self.sizes))


def collate_encoded(samples: Sequence[tuple[Tensor, int, str]]) -> tuple[EncodedBatch, Tensor]:
    """DataLoader collate for EncodedImageDataset: (EncodedBatch, int64 labels)."""
    datas, labels, paths = zip(*samples)
    batch = EncodedBatch(torch.cat(datas), [d.numel() for d in datas], list(paths),
                         [nvjpeg_decodable(d) for d in datas])
    return batch, torch.tensor(labels, dtype=torch.int64)


def reason(err: Exception) -> str:
    """First line of a torchvision error, without its "function, source.cpp:LINE, " prefix."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return re.sub(r"^\w+, \S+:\d+, ", "", line)
