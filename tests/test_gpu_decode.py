"""GPU JPEG decode input pipeline (wnconvert.models.data.gpu_decode), exercised on CPU.

On CPU, decode_jpeg/decode_image use libjpeg-turbo and decode bit-identically to PIL, so the eval
path can be held to PIL's eval transform within the rounding of the resize. The CUDA tests at the
end (nvjpeg vs libjpeg, the background stream) run only where a GPU is present.
"""

from __future__ import annotations

import io
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from wnconvert.convert.errors import UserInputError
from wnconvert.models.data.data import DataError, Preprocess, build_data, default_preprocess
from wnconvert.models.data.gpu_decode import (
    EncodedBatch,
    EncodedImageDataset,
    GpuBatchTransform,
    collate_encoded,
    device_batches,
    nvjpeg_decodable,
    random_resized_crops,
)
from wnconvert.models.train.train import TrainConfig, evaluate, train

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (height, width, PIL mode, progressive) per image; every class folder gets the same mix.
SHAPES = [(75, 100, "RGB", False), (90, 60, "RGB", True), (40, 52, "L", False),
          (64, 64, "CMYK", False), (30, 200, "RGB", False)]


from helpers import one_thread  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def natural_image(rng: np.random.Generator, h: int, w: int, tint: tuple[int, int, int]) -> np.ndarray:
    """A smooth random field plus noise (realistic JPEG content), pushed towards ``tint``."""
    coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    pixels = 0.5 * field + 0.5 * np.array(tint, np.float32) + rng.normal(0, 10, (h, w, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_folder(root: Path, per_class: int = len(SHAPES)) -> Path:
    """train/ and val/ with classes cat (reddish) and dog (bluish); mixed sizes, gray, CMYK,
    progressive JPEGs."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, tint in (("cat", (230, 40, 40)), ("dog", (40, 40, 230))):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w, mode, progressive = SHAPES[i % len(SHAPES)]
                image = Image.fromarray(natural_image(rng, h, w, tint)).convert(mode)
                image.save(root / split / name / f"{i}.jpg", quality=90, progressive=progressive)
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "data")


def preprocess(size: int = 32, interpolation: str = "bilinear") -> Preprocess:
    return Preprocess(size, round(size * 256 / 224), MEAN, STD, interpolation=interpolation)


def whole(dataset: EncodedImageDataset) -> tuple[EncodedBatch, torch.Tensor]:
    return collate_encoded([dataset[i] for i in range(len(dataset))])


def grey_levels(x: torch.Tensor) -> torch.Tensor:
    """Normalized values back to 0-255 levels."""
    return x * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255


# -- encoded bytes ---------------------------------------------------------------------------------

def test_dataset_and_collate(folder: Path) -> None:
    bundle = build_data(f"imagefolder:{folder}", preprocess(), gpu_decode=True)
    assert isinstance(bundle.train, EncodedImageDataset)
    assert isinstance(bundle.gpu_transform, GpuBatchTransform)
    assert (len(bundle.train), len(bundle.val), bundle.classes) == (10, 10, ["cat", "dog"])
    data, label, path = bundle.train[0]
    assert data.dtype == torch.uint8 and data.ndim == 1 and label == 0
    assert bytes(data.numpy()) == Path(path).read_bytes()
    batch, labels = whole(bundle.train)
    assert labels.dtype == torch.int64 and labels.tolist() == [0] * 5 + [1] * 5
    assert [Path(p).name for p in batch.paths[:5]] == [f"{i}.jpg" for i in range(5)]
    assert [bytes(d.numpy()) for d in batch.images()] == [Path(p).read_bytes() for p in batch.paths]
    # nvjpeg gets the 3-component JPEGs (baseline and progressive), the CPU the gray and CMYK ones
    assert batch.on_gpu == [True, True, False, False, True] * 2


def test_same_files_and_subsets_as_pil_path(folder: Path) -> None:
    spec, p = f"imagefolder:{folder}", preprocess()
    pil = build_data(spec, p, limit_train=4, limit_val=3, seed=5)
    enc = build_data(spec, p, limit_train=4, limit_val=3, seed=5, gpu_decode=True)
    assert enc.train.samples == [pil.train.dataset.samples[i] for i in pil.train.indices]
    assert enc.val.samples == [pil.val.dataset.samples[i] for i in pil.val.indices]


def test_nvjpeg_decodable_header_walk() -> None:
    def encoded(mode: str, **kw) -> torch.Tensor:
        buf = io.BytesIO()
        Image.new(mode, (8, 8)).save(buf, "JPEG", **kw)
        return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)

    assert nvjpeg_decodable(encoded("RGB"))
    assert nvjpeg_decodable(encoded("RGB", progressive=True))
    big_exif = encoded("RGB", exif=b"Exif\x00\x00" + bytes(30000))  # marker walk skips segments
    assert nvjpeg_decodable(big_exif)
    assert not nvjpeg_decodable(encoded("L")) and not nvjpeg_decodable(encoded("CMYK"))
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    for data in (png.getvalue(), b"", b"\xff\xd8", b"\xff\xd8\xff\xe0\x00", b"not a jpeg at all"):
        assert not nvjpeg_decodable(torch.frombuffer(bytearray(data), dtype=torch.uint8)
                                    if data else torch.empty(0, dtype=torch.uint8))


def test_collate_in_worker_processes(folder: Path) -> None:
    bundle = build_data(f"imagefolder:{folder}", preprocess(), gpu_decode=True)
    loader = DataLoader(bundle.val, batch_size=4, num_workers=2, collate_fn=bundle.gpu_transform.collate)
    batches = list(loader)
    assert [len(b) for b, _ in batches] == [4, 4, 2]
    assert sum(len(b.paths) for b, _ in batches) == 10


# -- the transform ---------------------------------------------------------------------------------

def test_output_shape_dtype_and_normalization(tmp_path: Path) -> None:
    """A flat-colour image comes out as exactly its normalized colour."""
    root = tmp_path / "flat"
    for split in ("train", "val"):
        (root / split / "only").mkdir(parents=True)
        Image.new("RGB", (48, 40), (200, 100, 50)).save(root / split / "only" / "a.jpg", quality=95)
    bundle = build_data(f"imagefolder:{root}", preprocess(24), gpu_decode=True)
    batch, _ = whole(bundle.val)
    pixel = np.asarray(Image.open(root / "val" / "only" / "a.jpg").convert("RGB"))[20, 24]
    expected = (torch.tensor(pixel / 255.0) - torch.tensor(MEAN)) / torch.tensor(STD)
    for train_mode in (False, True):
        x = bundle.gpu_transform(batch, "cpu", train=train_mode, generator=torch.Generator().manual_seed(0))
        assert x.shape == (1, 3, 24, 24) and x.dtype == torch.float32 and x.device.type == "cpu"
        torch.testing.assert_close(x[0].mean(dim=(1, 2)), expected.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("interpolation, max_levels", [("bilinear", 1), ("bicubic", 2)])
def test_eval_matches_pil_eval_transform(folder: Path, interpolation: str, max_levels: int) -> None:
    """Same numbers as Preprocess.eval_transform up to the rounding of the resize.

    On CPU both paths decode with libjpeg-turbo, bit-identically. The resize is torch's uint8
    antialiased kernel, a port of Pillow-SIMD's: the same 8-bit fixed-point scheme with a different
    coefficient precision, so an output pixel can land one grey level off after each of the two
    separable passes (seen: at most 1 level for bilinear, 2 for bicubic, on well under 1% of the
    pixels). One level is 1 / (255 * 0.224) = 0.0175 after normalization; anything from a wrong
    crop offset, resize size, channel order or normalization would be tens of levels off.
    """
    p = preprocess(40, interpolation)
    spec = f"imagefolder:{folder}"
    enc = build_data(spec, p, gpu_decode=True)
    pil = build_data(spec, p)
    batch, labels = whole(enc.val)
    x = enc.gpu_transform(batch, "cpu", train=False)
    torch.testing.assert_close(x, enc.gpu_transform(batch, "cpu", train=False), atol=0, rtol=0)
    reference = torch.stack([pil.val[i][0] for i in range(len(pil.val))])
    assert labels.tolist() == [pil.val[i][1] for i in range(len(pil.val))]
    levels = (grey_levels(x) - grey_levels(reference)).abs()
    assert levels.max() <= max_levels + 1e-3
    assert levels.mean() < 0.02


def test_train_path_is_seeded_and_augments(folder: Path) -> None:
    bundle = build_data(f"imagefolder:{folder}", preprocess(24), gpu_decode=True)
    batch, _ = whole(bundle.train)
    t = bundle.gpu_transform

    def run(seed: int) -> torch.Tensor:
        return t(batch, "cpu", train=True, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert a.shape == (10, 3, 24, 24) and not torch.equal(a, c)
    assert not torch.equal(a, t(batch, "cpu", train=False))
    levels = grey_levels(a)
    assert levels.min() > -0.01 and levels.max() < 255.01
    # no augmentation when the bundle was built with train_augment=False
    plain = build_data(f"imagefolder:{folder}", preprocess(24), gpu_decode=True, train_augment=False)
    torch.testing.assert_close(plain.gpu_transform(batch, "cpu", train=True), t(batch, "cpu", train=False))


def test_random_resized_crops_distribution() -> None:
    """Same distribution as torchvision's RandomResizedCrop.get_params (compared on 4000 draws
    each: standard errors of the means are about 0.003, the tolerances 5x that)."""
    from torchvision.transforms import RandomResizedCrop

    n = 4000
    sizes = torch.tensor([[375, 500]] * n + [[10, 1000], [1000, 10]])
    boxes = random_resized_crops(sizes, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= sizes[:, 0]).all() and (left + w <= sizes[:, 1]).all()
    torch.manual_seed(0)
    image = torch.zeros(1, 375, 500)
    reference = torch.tensor([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                              for _ in range(n)])

    def stats(b: torch.Tensor) -> torch.Tensor:
        b = b.double()
        frac, log_ratio = b[:, 2] * b[:, 3] / (375 * 500), (b[:, 3] / b[:, 2]).log()
        return torch.stack([frac.mean(), frac.std(), log_ratio.mean(), log_ratio.std(),
                            b[:, 0].mean() / 375, b[:, 1].mean() / 500])

    torch.testing.assert_close(stats(boxes[:n]), stats(reference), atol=0.015, rtol=0)
    frac = boxes[:n, 2] * boxes[:n, 3] / (375 * 500)
    assert frac.min() >= 0.075 and frac.max() <= 1.0
    # extreme aspect ratios: no attempt fits, so the whole image clamped to the ratio range, centered
    assert boxes[n].tolist() == [0, 493, 10, 13] and boxes[n + 1].tolist() == [493, 0, 13, 10]


def test_corrupt_files_name_the_file(folder: Path) -> None:
    broken = folder / "val" / "dog" / "broken.jpg"
    good = (folder / "val" / "dog" / "0.jpg").read_bytes()
    for content in (b"not a jpeg", good[: len(good) // 3], good[:2] + bytes(500)):
        broken.write_bytes(content)
        bundle = build_data(f"imagefolder:{folder}", preprocess(), gpu_decode=True)
        batch, _ = whole(bundle.val)
        with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg") as info:
            bundle.gpu_transform(batch, "cpu", train=False)
        assert "\n" not in str(info.value) and isinstance(info.value, UserInputError)
    # unreadable files fail in the worker already, also naming the file
    broken.write_bytes(b"")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg: .*empty"):
        bundle.val[len(bundle.val) - 1]
    broken.unlink()
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg"):
        bundle.val[len(bundle.val) - 1]


def test_gpu_decode_needs_an_imagefolder() -> None:
    with pytest.raises(DataError, match="imagefolder"):
        build_data("synthetic:4", default_preprocess("synthetic", image_size=16), gpu_decode=True)


# -- feeding the loop ------------------------------------------------------------------------------

@pytest.mark.parametrize("background", [False, True])
def test_device_batches(folder: Path, background: bool) -> None:
    bundle = build_data(f"imagefolder:{folder}", preprocess(24), gpu_decode=True)
    loader = DataLoader(bundle.train, batch_size=4, collate_fn=collate_encoded)

    def epoch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(device_batches(loader, bundle.gpu_transform, "cpu", train=True,
                                   generator=torch.Generator().manual_seed(seed), background=background))

    first = epoch(0)
    assert [tuple(x.shape) for x, _ in first] == [(4, 3, 24, 24), (4, 3, 24, 24), (2, 3, 24, 24)]
    assert torch.cat([y for _, y in first]).tolist() == [0] * 5 + [1] * 5
    for (x0, _), (x1, _) in zip(first, epoch(0)):
        torch.testing.assert_close(x0, x1, atol=0, rtol=0)
    # without a generator the augmentation follows torch's global seed (checkpointed by train())
    torch.manual_seed(3)
    a = list(device_batches(loader, bundle.gpu_transform, "cpu", train=True, background=background))
    torch.manual_seed(3)
    b = list(device_batches(loader, bundle.gpu_transform, "cpu", train=True, background=background))
    assert all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(a, b))


def test_background_thread_errors_and_early_close(folder: Path) -> None:
    (folder / "train" / "dog" / "4.jpg").write_bytes(b"garbage")
    bundle = build_data(f"imagefolder:{folder}", preprocess(24), gpu_decode=True)
    loader = DataLoader(bundle.train, batch_size=2, collate_fn=collate_encoded)
    before = threading.active_count()
    with pytest.raises(DataError, match=r"4\.jpg"):
        for _ in device_batches(loader, bundle.gpu_transform, "cpu", train=False, background=True):
            pass
    batches = device_batches(loader, bundle.gpu_transform, "cpu", train=False, background=True)
    next(batches)
    batches.close()  # what train() does on Ctrl-C: the producer thread ends
    assert threading.active_count() == before


# -- train() and evaluate() ----------------------------------------------------------------------

def test_train_with_gpu_decode(folder: Path, tmp_path: Path) -> None:
    bundle = build_data(f"imagefolder:{folder}", preprocess(24), gpu_decode=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    config = TrainConfig(epochs=1, batch_size=4, optimizer="sgd", lr=0.05, workers=0, log_every=1, device="cpu")
    result = train(model, bundle, config, tmp_path / "run")
    assert len(result.history) == 1 and math.isfinite(result.history[0].train_loss)
    assert (tmp_path / "run" / "train" / "last.pt").is_file()
    again = evaluate(model, bundle.val, batch_size=3, gpu_transform=bundle.gpu_transform)
    assert again["images"] == 10 and again["val_top1"] == result.history[0].val_top1


# -- CUDA only ---------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def headers_only(jpeg: bytes) -> bytes:
    """The file cut right before its scan: nvjpeg_decodable() accepts it, no decoder can decode it."""
    return jpeg[: jpeg.index(b"\xff\xda")]


def test_headers_only_file_is_routed_to_nvjpeg_then_named(folder: Path) -> None:
    broken = folder / "val" / "cat" / "cut.jpg"
    broken.write_bytes(headers_only((folder / "val" / "cat" / "0.jpg").read_bytes()))
    bundle = build_data(f"imagefolder:{folder}", preprocess(), gpu_decode=True)
    batch, _ = whole(bundle.val)
    assert batch.on_gpu[batch.paths.index(str(broken))]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with pytest.raises(DataError, match=r"cannot read image .*cut\.jpg"):
        bundle.gpu_transform(batch, device, train=False)


@cuda_only
def test_nvjpeg_matches_cpu_decode(folder: Path) -> None:
    bundle = build_data(f"imagefolder:{folder}", preprocess(40), gpu_decode=True)
    batch, _ = whole(bundle.val)
    x = bundle.gpu_transform(batch, "cuda", train=False)
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    levels = (grey_levels(x.cpu()) - grey_levels(bundle.gpu_transform(batch, "cpu", train=False))).abs()
    # nvjpeg's IDCT and chroma upsampling differ slightly from libjpeg's (torchvision's own test
    # allows a mean of 2 levels), and CUDA resizes in float
    assert levels.mean() < 2


@cuda_only
def test_background_stream_matches_inline_on_cuda(folder: Path) -> None:
    bundle = build_data(f"imagefolder:{folder}", preprocess(24), gpu_decode=True)
    loader = DataLoader(bundle.train, batch_size=4, collate_fn=collate_encoded, pin_memory=True)

    def epoch(background: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(device_batches(loader, bundle.gpu_transform, "cuda", train=True, background=background,
                                   generator=torch.Generator().manual_seed(0)))

    for (x0, y0), (x1, y1) in zip(epoch(False), epoch(True)):
        assert x1.is_cuda and y1.is_cuda and x1.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x0, x1, atol=1e-5, rtol=0)
        assert torch.equal(y0, y1)
