"""GPU JPEG decoding for ImageFolder training (``build_data(..., gpu_decode=True)``).

With PIL, every image is decoded, cropped and resized by CPU DataLoader workers; 16 workers feed an
H100 well under half of what it trains. Here the workers only read file bytes
(:mod:`.encoded`); :class:`GpuBatchTransform` decodes a whole
batch with nvjpeg (``torchvision.io.decode_jpeg(list, device="cuda")``) and crops, resizes, flips
and normalizes it on the device. :func:`device_batches` runs that transform a batch or two ahead
in a background thread on a side CUDA stream, so decoding overlaps the training step.

On CPU the same code decodes with libjpeg-turbo (bit-identical to PIL's decode), which is what the
tests exercise; the eval path then reproduces :meth:`Preprocess.eval_transform` to within the
rounding of the resize (one grey level for bilinear). nvjpeg's decode differs from libjpeg's by
about a grey level on average.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from typing import Callable, Generator, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from .dataspec import DataError
from .encoded import EncodedBatch, EncodedImageDataset, collate_encoded, nvjpeg_decodable, reason  # noqa: F401 (re-exported)
from .preprocess import Preprocess, resized_size

RRC_SCALE = (0.08, 1.0)        # RandomResizedCrop defaults, as in Preprocess.train_transform
RRC_RATIO = (3 / 4, 4 / 3)
_RRC_ATTEMPTS = 10


# --------------------------------------------------------------------------------------------------
# Decoding and augmentation on the device


def random_resized_crops(sizes: Tensor, generator: torch.Generator | None = None,
                         scale: tuple[float, float] = RRC_SCALE,
                         ratio: tuple[float, float] = RRC_RATIO) -> Tensor:
    """RandomResizedCrop boxes for N images of ``sizes`` (N,2: height, width) -> N,4 int64
    (top, left, height, width), sampled for all images at once.

    Same distribution as torchvision's RandomResizedCrop.get_params: up to 10 attempts of a random
    area fraction in ``scale`` and log-uniform aspect ratio in ``ratio``, the first that fits wins;
    if none fits, the whole image clamped to the ratio range, centered.
    """
    n = sizes.shape[0]
    h_img, w_img = sizes[:, :1].double(), sizes[:, 1:].double()
    area = torch.empty(n, _RRC_ATTEMPTS, dtype=torch.float64).uniform_(*scale, generator=generator)
    area *= h_img * w_img
    log_r = torch.empty(n, _RRC_ATTEMPTS, dtype=torch.float64)
    aspect = log_r.uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp_()
    w = (area * aspect).sqrt_().round_()  # round half to even, like Python's round()
    h = (area / aspect).sqrt_().round_()
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    first = fits.int().argmax(dim=1, keepdim=True)  # argmax returns the first maximal index
    found = fits.any(dim=1)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    h_img, w_img = h_img[:, 0], w_img[:, 0]
    in_ratio = w_img / h_img
    fb_w = torch.where(in_ratio > ratio[1], (h_img * ratio[1]).round(), w_img)
    fb_h = torch.where(in_ratio < ratio[0], (w_img / ratio[0]).round(), h_img)
    w, h = torch.where(found, w, fb_w), torch.where(found, h, fb_h)
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)  # drawn for all: fixed stream use
    top = torch.where(found, (u[:, 0] * (h_img - h + 1)).floor(), ((h_img - h) / 2).floor())
    left = torch.where(found, (u[:, 1] * (w_img - w + 1)).floor(), ((w_img - w) / 2).floor())
    return torch.stack([top, left, h, w], dim=1).long()


class GpuBatchTransform:
    """Encoded images -> normalized float32 N,3,S,S batch on a device (channels_last on CUDA).

    ``train=True`` (and ``augment``): RandomResizedCrop to ``image_size`` (antialiased resize with
    the preprocess interpolation) and a random horizontal flip. Otherwise the eval transform:
    shorter side to ``resize_size``, center crop ``image_size``. Resized pixels are rounded to
    whole grey levels like PIL's 8-bit output, then normalized with the preprocess mean/std.
    The crops are cut before the resize, so a train crop costs only its own pixels.
    """

    collate = staticmethod(collate_encoded)  # what train() gives the DataLoader for this transform

    def __init__(self, preprocess: Preprocess, augment: bool = True) -> None:
        self.preprocess, self.augment = preprocess, augment
        # (x / 255 - mean) / std == x * scale + shift: one fused op over the batch
        self._scale = [1 / (255 * s) for s in preprocess.std]
        self._shift = [-m / s for m, s in zip(preprocess.mean, preprocess.std)]
        self._constants: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, batch: EncodedBatch, device: torch.device | str, *, train: bool,
                 generator: torch.Generator | None = None) -> Tensor:
        device = _indexed(torch.device(device))
        images = decode_batch(batch, device)
        if not (train and self.augment):
            return self._finish(self._eval_crops(images), device)
        x = self._random_crops(images, generator)
        flip = torch.rand(len(images), generator=generator) < 0.5
        if device.type == "cuda":
            flip = flip.pin_memory()  # a truly asynchronous copy: no wait in the decode thread
        flip = flip.to(device, non_blocking=True).view(-1, 1, 1, 1)
        return self._finish(torch.where(flip, x.flip(3), x), device)

    def _resize(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """uint8 1x3xHxW -> float32 1x3xhxw with 0-255 values, antialiased."""
        mode = self.preprocess.interpolation
        if image.device.type == "cpu":
            # torch's uint8 antialiased kernel (from Pillow-SIMD) is ~30x faster than the float one
            # on CPU and within one grey level of PIL. CUDA has only the float kernel.
            image = image.contiguous(memory_format=torch.channels_last)
            return F.interpolate(image, size, mode=mode, antialias=True, align_corners=False).float()
        return F.interpolate(image.float(), size, mode=mode, antialias=True, align_corners=False)

    def _random_crops(self, images: list[Tensor], generator: torch.Generator | None) -> Tensor:
        s = self.preprocess.image_size
        sizes = torch.tensor([img.shape[-2:] for img in images])
        boxes = random_resized_crops(sizes, generator).tolist()
        # One resize per image (the crops differ in size); everything after it is batched.
        return torch.cat([self._resize(img[None, :, top : top + h, left : left + w], (s, s))
                          for img, (top, left, h, w) in zip(images, boxes)])

    def _eval_crops(self, images: list[Tensor]) -> Tensor:
        p, s = self.preprocess, self.preprocess.image_size
        out = []
        for img in images:
            h, w = img.shape[-2:]
            new_h, new_w = resized_size(h, w, p.resize_size)  # the rule Preprocess uses
            x = img[None]
            x = self._resize(x, (new_h, new_w)) if (new_h, new_w) != (h, w) else x.float()
            top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
            out.append(x[:, :, top : top + s, left : left + s])
        return torch.cat(out)

    def _finish(self, x: Tensor, device: torch.device) -> Tensor:
        x = x.round_().clamp_(0, 255)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if device not in self._constants:
            self._constants[device] = (torch.tensor(self._scale, device=device).view(1, 3, 1, 1),
                                       torch.tensor(self._shift, device=device).view(1, 3, 1, 1))
        scale, shift = self._constants[device]
        return torch.addcmul(shift, x, scale)  # keeps x's memory format


def decode_batch(batch: EncodedBatch, device: torch.device) -> list[Tensor]:
    """uint8 3xHxW RGB images on ``device``, in batch order.

    On CUDA the nvjpeg-decodable images go through one batched decode_jpeg call; the rest (and, on
    CPU, all) are decoded on the CPU and copied over. One bad file fails the whole batched call
    without naming it, so then the images are retried one by one: a file nvjpeg rejects goes to the
    CPU decoder, which decodes it (libjpeg accepts a few files nvjpeg does not) or names it.
    """
    encoded = batch.images()
    out: list[Tensor | None] = [None] * len(encoded)
    if device.type == "cuda":
        gpu = [i for i, ok in enumerate(batch.on_gpu) if ok]
        if gpu:
            try:
                decoded = decode_jpeg([encoded[i] for i in gpu], mode=ImageReadMode.RGB, device=device)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError:
                decoded = [_try_nvjpeg(encoded[i], device) for i in gpu]
            for i, img in zip(gpu, decoded):
                out[i] = img
    return [img if img is not None else _decode_cpu(data, path).to(device)
            for img, data, path in zip(out, encoded, batch.paths)]


def _try_nvjpeg(data: Tensor, device: torch.device) -> Tensor | None:
    try:
        return decode_jpeg([data], mode=ImageReadMode.RGB, device=device)[0]
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError:
        return None


def _decode_cpu(data: Tensor, path: str) -> Tensor:
    try:
        # JPEG (gray and CMYK converted to RGB, as PIL's convert("RGB") does), PNG, WebP, GIF
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise DataError(f"cannot read image {path}: {reason(err)}") from None
    if image.ndim == 4:  # animated GIF: first frame
        image = image[0]
    return image if image.dtype == torch.uint8 else image.float().div_(257)  # 16-bit PNG


# --------------------------------------------------------------------------------------------------
# Feeding the training loop


def device_batches(loader: Iterable[tuple[EncodedBatch, Tensor]], transform: GpuBatchTransform,
                   device: torch.device | str, *, train: bool,
                   generator: torch.Generator | None = None, background: bool | None = None,
                   depth: int = 2) -> Generator[tuple[Tensor, Tensor], None, None]:
    """(images, labels) ready on ``device`` for each batch of ``loader``; close() it when done early.

    Without a ``generator`` the train augmentation is seeded from torch's global generator when
    iteration starts, so train()'s per-rank seeding and checkpointed RNG state cover it.

    ``background`` (default: on CUDA) runs decode and transform up to ``depth`` batches ahead in a
    thread, on a side CUDA stream. The nvjpeg call blocks its thread until the batch is decoded and
    the training step waits on its loss every step, so done inline the GPU would sit idle for every
    decode; torch and torchvision ops release the GIL, so the two threads overlap.
    """
    device = _indexed(torch.device(device))
    if generator is None and train and transform.augment:
        generator = torch.Generator().manual_seed(int(torch.randint(2**63 - 1, ())))

    def work(batch: EncodedBatch, labels: Tensor) -> tuple[Tensor, Tensor]:
        return (transform(batch, device, train=train, generator=generator),
                labels.to(device, non_blocking=True))

    if background is None:
        background = device.type == "cuda"
    if not background:
        return (work(batch, labels) for batch, labels in loader)
    return _prefetch(loader, work, device, depth)


def _prefetch(loader: Iterable[tuple[EncodedBatch, Tensor]],
              work: Callable[[EncodedBatch, Tensor], tuple[Tensor, Tensor]],
              device: torch.device, depth: int) -> Generator[tuple[Tensor, Tensor], None, None]:
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None

    def put(item: tuple) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            with contextlib.ExitStack() as context:
                if cuda:  # current device and stream are per thread
                    context.enter_context(torch.cuda.device(device))
                    context.enter_context(torch.cuda.stream(side))
                for batch, labels in loader:
                    x, y = work(batch, labels)
                    ready = None
                    if cuda:
                        ready = torch.cuda.Event()
                        ready.record(side)
                    if not put(("batch", x, y, ready)):
                        return
            put(("end",))
        except BaseException as err:  # handed to the consumer, raised there
            put(("error", err))

    thread = threading.Thread(target=produce, name="gpu-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item[0] == "end":
                return
            if item[0] == "error":
                raise item[1]
            _, x, y, ready = item
            if cuda:
                current = torch.cuda.current_stream(device)
                current.wait_event(ready)
                # Made on the side stream, used on this one: keep the allocator from reusing them early.
                x.record_stream(current)
                y.record_stream(current)
            yield x, y
    finally:
        stop.set()
        thread.join(timeout=60)  # the producer stops after the batch it is working on


def _indexed(device: torch.device) -> torch.device:
    """cuda -> cuda:N. torchvision rebuilds its nvjpeg decoder whenever it is handed a device that
    compares unequal to the last one, and "cuda" != "cuda:0"."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
