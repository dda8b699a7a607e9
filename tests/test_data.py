"""Data specs, preprocessing and dataset readers (wnconvert.models.data.data)."""

from __future__ import annotations

import gzip
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from wnconvert.convert.errors import UserInputError
from wnconvert.models.data.data import (
    DataError,
    DataSpec,
    Preprocess,
    build_data,
    default_preprocess,
    eval_arrays,
    parse_data_spec,
)
from wnconvert.models.data.datasets import FASHION_MNIST_CLASSES, read_fashion_mnist

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def raises_one_line(fn, *args, match: str | None = None, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    assert isinstance(info.value, UserInputError)
    return message


def decode(x: torch.Tensor | np.ndarray, channel: int = 0) -> np.ndarray:
    """Normalized values back to 0-255 grey levels."""
    x = np.asarray(x, dtype=np.float64)
    return np.rint((x * STD[channel] + MEAN[channel]) * 255)


# --------------------------------------------------------------------------------------------------
# Specs


@pytest.mark.parametrize(
    "text",
    ["imagefolder:/data/imagenet", "cifar10:/d/c10", "cifar100:rel/c100", "fashion-mnist",
     "fashion-mnist:/tmp/fm", "synthetic", "synthetic:10", "imagefolder:C:/data"],
)  # fmt: skip
def test_spec_round_trip(text: str) -> None:
    spec = parse_data_spec(text)
    assert str(spec) == text
    assert parse_data_spec(str(spec)) == spec


def test_spec_normalization() -> None:
    assert parse_data_spec(" Synthetic:010 ") == DataSpec("synthetic", "10")
    assert parse_data_spec("imagefolder:C:/x").path == "C:/x"  # split at the first colon only
    assert parse_data_spec("synthetic").synthetic_classes == 1000


@pytest.mark.parametrize(
    "text, match",
    [("imagenet:/data", "valid kinds: imagefolder, cifar10"), ("", "valid kinds"),
     ("imagefolder", "needs a path"), ("cifar10", "needs a path"), ("imagefolder:", "empty path"),
     ("synthetic:abc", "integer"), ("synthetic:1", ">= 2")],
)  # fmt: skip
def test_bad_specs(text: str, match: str) -> None:
    raises_one_line(parse_data_spec, text, match=match)


def test_dataspec_validates_direct_construction() -> None:
    raises_one_line(DataSpec, "mnist", None, match="unknown data kind")


# --------------------------------------------------------------------------------------------------
# Preprocess


def test_default_preprocess() -> None:
    fm = default_preprocess("fashion-mnist")
    assert (fm.image_size, fm.resize_size, fm.grayscale_to_rgb) == (32, 32, True)
    assert fm.mean == MEAN and fm.std == STD
    assert (default_preprocess("cifar10:/x").image_size, default_preprocess("cifar100:/x").resize_size) == (32, 32)
    inet = default_preprocess("imagefolder:/x")
    assert (inet.image_size, inet.resize_size, inet.grayscale_to_rgb) == (224, 256, False)
    assert default_preprocess("imagefolder:/x", image_size=160).resize_size == 183  # 224/256 kept
    assert default_preprocess("synthetic").image_size == 224
    custom = default_preprocess("fashion-mnist", 64, mean=(0.5, 0.5, 0.5), std=[0.25] * 3)
    assert (custom.image_size, custom.resize_size, custom.mean, custom.std) == (64, 64, (0.5,) * 3, (0.25,) * 3)
    raises_one_line(default_preprocess, "synthetic", 0)


def test_preprocess_dict_round_trip() -> None:
    p = Preprocess(24, 27, MEAN, STD, grayscale_to_rgb=True, interpolation="bicubic")
    d = json.loads(json.dumps(p.to_dict()))
    assert Preprocess.from_dict(d) == p
    assert Preprocess.from_dict({**d, "future_key": 1}) == p
    d.pop("std")
    raises_one_line(Preprocess.from_dict, d, match="missing std")


@pytest.mark.parametrize(
    "kwargs",
    [dict(image_size=0), dict(image_size=32, resize_size=16), dict(mean=(0.5, 0.5)), dict(std=(1, 0, 1)),
     dict(interpolation="nearest"), dict(image_size="32"), dict(mean=("a", 1, 2))],
)  # fmt: skip
def test_preprocess_validation(kwargs: dict) -> None:
    raises_one_line(Preprocess, **(dict(image_size=32, resize_size=32, mean=MEAN, std=STD) | kwargs))


def torchvision_reference(p: Preprocess, gray: bool):
    """The textbook torchvision eval pipeline that our shared numpy path must reproduce."""
    return v2.Compose([
        v2.Resize(p.resize_size, interpolation=InterpolationMode(p.interpolation), antialias=True),
        v2.CenterCrop(p.image_size),
        *([v2.Grayscale(3)] if gray else []),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(p.mean), list(p.std)),
    ])


def test_apply_numpy_matches_eval_transform_grayscale() -> None:
    images = np.random.default_rng(0).integers(0, 256, (16, 28, 28), dtype=np.uint8)
    p = default_preprocess("fashion-mnist")
    batch = p.apply_numpy(images)
    assert batch.shape == (16, 3, 32, 32) and batch.dtype == np.float32
    per_image = np.stack([p.eval_transform()(Image.fromarray(im)).numpy() for im in images])
    reference = np.stack([torchvision_reference(p, gray=True)(Image.fromarray(im)).numpy() for im in images])
    np.testing.assert_allclose(batch, per_image, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batch, reference, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(p.apply_numpy(images[..., None]), batch)  # N,H,W,1 == N,H,W


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_apply_numpy_matches_eval_transform_rgb(interpolation: str) -> None:
    rng = np.random.default_rng(1)
    p = Preprocess(24, 27, MEAN, STD, interpolation=interpolation)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(30, 40, 3), (50, 20, 3), (27, 27, 3)]]
    batch = p.apply_numpy(images)  # a list: sizes differ
    for image, row in zip(images, batch):
        reference = torchvision_reference(p, gray=False)(Image.fromarray(image)).numpy()
        np.testing.assert_allclose(row, p.eval_transform()(Image.fromarray(image)).numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(row, reference, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(p.apply_numpy(np.stack([images[0]] * 2)), batch[[0, 0]])


def test_apply_numpy_rejects_bad_input() -> None:
    p = default_preprocess("fashion-mnist")
    raises_one_line(p.apply_numpy, np.zeros((2, 28, 28), np.float32), match="uint8")
    raises_one_line(p.apply_numpy, np.zeros((2, 28, 28, 4), np.uint8), match="HxWx3")
    raises_one_line(p.apply_numpy, np.zeros((28, 28), np.uint8), match="N,H,W")
    assert p.apply_numpy(np.zeros((0, 28, 28), np.uint8)).shape == (0, 3, 32, 32)


def test_small_train_transform() -> None:
    p = default_preprocess("fashion-mnist")
    tf = p.train_transform(small_images=True)
    halves = np.full((28, 28), 60, np.uint8)
    halves[:, 14:] = 240  # dark left, bright right: shows flips
    torch.manual_seed(0)
    outs = torch.stack([tf(Image.fromarray(halves)) for _ in range(32)])
    assert outs.shape == (32, 3, 32, 32) and outs.dtype == torch.float32
    grey = decode(outs[:, 0])
    assert {0.0, 60.0, 240.0} <= set(np.unique(grey)) <= set(range(256))
    assert len({(g == 0).tobytes() for g in grey}) > 1  # crop offsets vary
    first = [row[row > 0][0] for row in grey[:, 16]]  # leftmost image pixel of the middle row
    assert {60.0, 240.0} <= set(first)  # both flipped and unflipped
    assert tf.batch(np.repeat(halves[None], 5, axis=0)).shape == (5, 3, 32, 32)


# --------------------------------------------------------------------------------------------------
# ImageFolder


def write_image_folder(root: Path, counts: dict[str, dict[str, int]]) -> None:
    """JPEGs of 40x30 px; 'cat' images are red, 'dog' images blue (so labels can be checked)."""
    colors = {"cat": (220, 30, 30), "dog": (30, 30, 220)}
    rng = np.random.default_rng(0)
    for split, classes in counts.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(colors[name]) + rng.integers(-20, 20, (30, 40, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.jpg")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    write_image_folder(tmp_path, {"train": {"cat": 4, "dog": 3}, "val": {"cat": 2, "dog": 2}})
    return tmp_path


def test_imagefolder(image_folder: Path) -> None:
    spec = f"imagefolder:{image_folder}"
    p = default_preprocess(spec, image_size=24)
    bundle = build_data(spec, p)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (7, 4, 2)
    assert bundle.classes == ["cat", "dog"] and not bundle.small_images
    for dataset in (bundle.train, bundle.val):
        for x, y in dataset:
            assert x.shape == (3, 24, 24) and x.dtype == torch.float32
            red, blue = decode(x[0], 0).mean(), decode(x[2], 2).mean()
            assert (red > blue) == (y == 0)
    images, labels = eval_arrays(spec, p)
    assert images.shape == (4, 3, 24, 24) and labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(images[0], bundle.val[0][0].numpy())


def test_imagefolder_limit(image_folder: Path) -> None:
    spec = f"imagefolder:{image_folder}"
    p = default_preprocess(spec, image_size=16)
    a = build_data(spec, p, limit_train=3, limit_val=2, train_augment=False)
    b = build_data(spec, p, limit_train=3, limit_val=2, train_augment=False)
    assert (len(a.train), len(a.val)) == (3, 2)
    assert a.train.indices == b.train.indices
    images, labels = eval_arrays(spec, p, limit=2)
    assert labels.tolist() == [a.val[i][1] for i in range(2)]
    np.testing.assert_array_equal(images, np.stack([a.val[i][0].numpy() for i in range(2)]))


def test_imagefolder_errors(tmp_path: Path) -> None:
    raises_one_line(build_data, f"imagefolder:{tmp_path / 'nope'}", default_preprocess("synthetic"),
                    match="not a directory")  # fmt: skip
    p = default_preprocess("imagefolder:/x", image_size=16)
    write_image_folder(tmp_path / "a", {"train": {"cat": 1, "dog": 1}})
    raises_one_line(build_data, f"imagefolder:{tmp_path / 'a'}", p, match="no val/ folder")
    write_image_folder(tmp_path / "b", {"val": {"cat": 1, "dog": 1}})
    raises_one_line(build_data, f"imagefolder:{tmp_path / 'b'}", p, match="no train/ folder")
    write_image_folder(tmp_path / "c", {"train": {"cat": 1, "dog": 1}, "val": {"cat": 1}})
    raises_one_line(build_data, f"imagefolder:{tmp_path / 'c'}", p, match="missing in val/: dog")
    write_image_folder(tmp_path / "d", {"train": {"cat": 1}, "val": {"cat": 1}})
    (tmp_path / "d" / "train" / "dog").mkdir()  # a class folder without images
    raises_one_line(build_data, f"imagefolder:{tmp_path / 'd'}", p)
    (tmp_path / "e" / "train").mkdir(parents=True)
    (tmp_path / "e" / "val").mkdir()
    raises_one_line(build_data, f"imagefolder:{tmp_path / 'e'}", p)


def test_imagefolder_corrupt_image(image_folder: Path) -> None:
    (image_folder / "val" / "cat" / "0.jpg").write_bytes(b"not a jpeg")
    bundle = build_data(f"imagefolder:{image_folder}", default_preprocess("imagefolder:/x", 16))
    raises_one_line(bundle.val.__getitem__, 0, match="cannot read image .*0.jpg")


def test_imagefolder_symlink_loop_and_escape(image_folder: Path, tmp_path_factory) -> None:
    p = default_preprocess("imagefolder:/x", image_size=16)
    spec = f"imagefolder:{image_folder}"
    loop = image_folder / "train" / "cat" / "again"
    loop.symlink_to(image_folder / "train")  # torchvision's walk multiplies the images through it
    raises_one_line(build_data, spec, p, match="leads back to .*already read")
    loop.unlink()
    outside = tmp_path_factory.mktemp("elsewhere")
    (outside / "x.jpg").write_bytes((image_folder / "train" / "cat" / "0.jpg").read_bytes())
    (image_folder / "train" / "dog" / "far").symlink_to(outside)
    raises_one_line(build_data, spec, p, match="links outside")
    (image_folder / "train" / "dog" / "far").unlink()
    (image_folder / "train" / "dog" / "x.jpg").symlink_to(outside / "x.jpg")
    raises_one_line(build_data, spec, p, match="x.jpg links outside")
    (image_folder / "train" / "dog" / "x.jpg").unlink()
    # A split folder that is itself a link (a mounted disk), and links inside it, are fine.
    moved = tmp_path_factory.mktemp("mounted") / "train"
    (image_folder / "train").rename(moved)
    (image_folder / "train").symlink_to(moved)
    (moved / "cat" / "sub").mkdir()
    (moved / "cat" / "sub" / "link.jpg").symlink_to(moved / "dog" / "0.jpg")
    bundle = build_data(spec, p)
    assert len(bundle.train) == 8 and bundle.num_classes == 2


def test_imagefolder_corrupt_image_in_worker(image_folder: Path) -> None:
    from torch.utils.data import DataLoader

    (image_folder / "val" / "dog" / "1.jpg").write_bytes(b"not a jpeg")
    bundle = build_data(f"imagefolder:{image_folder}", default_preprocess("imagefolder:/x", 16))
    loader = DataLoader(bundle.val, batch_size=1, num_workers=2)
    message = raises_one_line(lambda: list(loader), match="cannot read image .*dog.1.jpg")
    assert "worker" not in message and "Traceback" not in message


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_fashion(root: Path, n_train: int = 50, n_test: int = 20) -> None:
    """Image i of each split: row 0 holds i, every other pixel 20 * label + 10; label = (3 * i) % 10."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (3 * np.arange(n)) % 10
        images = np.repeat(20 * labels + 10, 28 * 28).reshape(n, 28, 28)
        images[:, 0, :] = np.arange(n)[:, None]
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images, 2051)))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels, 2049)))


def decode_fashion(x: torch.Tensor) -> tuple[int, int]:
    """(index, label) encoded by write_fashion, from an unresized (28 px) preprocessed image."""
    return int(decode(x[0, 0, 14])), int((decode(x[0, 14, 14]) - 10) // 20)


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    write_fashion(tmp_path / "fm")
    return tmp_path / "fm"


def test_fashion_mnist(fashion_dir: Path) -> None:
    spec = f"fashion-mnist:{fashion_dir}"
    p = default_preprocess(spec, image_size=28)  # no resize, so pixels can be decoded exactly
    bundle = build_data(spec, p, train_augment=False)
    assert (len(bundle.train), len(bundle.val)) == (50, 20)
    assert bundle.classes == FASHION_MNIST_CLASSES and bundle.num_classes == 10 and bundle.small_images
    for dataset in (bundle.train, bundle.val):
        for i in range(len(dataset)):
            x, y = dataset[i]
            assert x.shape == (3, 28, 28) and isinstance(y, int)
            assert decode_fashion(x) == (i, y) and y == (3 * i) % 10
    # The default 32 px preprocessing, through a DataLoader (batched fetch, worker processes).
    p32 = default_preprocess(spec)
    bundle = build_data(spec, p32)
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=16, num_workers=2)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    assert batches[0][0].shape == (16, 3, 32, 32) and batches[0][1].dtype == torch.int64
    assert torch.cat([y for _, y in batches]).tolist() == [(3 * i) % 10 for i in range(50)]
    val = next(iter(torch.utils.data.DataLoader(bundle.val, batch_size=20)))[0]
    images, labels = eval_arrays(spec, p32)
    np.testing.assert_allclose(images, val.numpy(), atol=1e-5, rtol=0)
    assert labels.dtype == np.int64 and labels.tolist() == [(3 * i) % 10 for i in range(20)]
    # split="train": the training images without augmentation, same subset as limit_train
    train = build_data(spec, p32, limit_train=12, train_augment=False).train
    images, labels = eval_arrays(spec, p32, limit=12, split="train")
    np.testing.assert_allclose(images, np.stack([train[i][0].numpy() for i in range(12)]), atol=1e-5, rtol=0)
    assert labels.tolist() == [train[i][1] for i in range(12)]
    raises_one_line(eval_arrays, spec, p32, split="test", match="unknown split")


def test_fashion_mnist_limit(fashion_dir: Path) -> None:
    spec = f"fashion-mnist:{fashion_dir}"
    p = default_preprocess(spec, image_size=28)

    def picked(seed: int) -> tuple[list[int], list[int]]:
        bundle = build_data(spec, p, limit_train=20, limit_val=8, seed=seed, train_augment=False)
        assert (len(bundle.train), len(bundle.val)) == (20, 8)
        train = [decode_fashion(bundle.train[i][0])[0] for i in range(20)]
        val = [decode_fashion(bundle.val[i][0])[0] for i in range(8)]
        for dataset, indices in ((bundle.train, train), (bundle.val, val)):
            assert [dataset[i][1] for i in range(len(indices))] == [(3 * j) % 10 for j in indices]
        return train, val

    train, val = picked(0)
    assert picked(0) == (train, val)  # deterministic
    assert train != list(range(20)) and val != list(range(8))  # not the first N
    assert len({(3 * j) % 10 for j in train}) >= 5  # classes mixed
    assert picked(1) != (train, val)
    images, labels = eval_arrays(spec, p, limit=8)
    assert [decode_fashion(torch.from_numpy(x))[0] for x in images] == val
    assert labels.tolist() == [(3 * j) % 10 for j in val]


def test_fashion_mnist_errors(fashion_dir: Path, tmp_path: Path) -> None:
    p = default_preprocess("fashion-mnist")
    raises_one_line(build_data, f"fashion-mnist:{tmp_path / 'none'}", p, match="does not exist")
    images_gz = fashion_dir / "t10k-images-idx3-ubyte.gz"
    good = gzip.decompress(images_gz.read_bytes())
    spec = f"fashion-mnist:{fashion_dir}"

    images_gz.write_bytes(gzip.compress(good[:-100]))  # truncated data
    raises_one_line(build_data, spec, p, match="truncated or corrupt")
    images_gz.write_bytes(gzip.compress(good)[:-30])  # truncated gzip stream
    raises_one_line(build_data, spec, p, match="cannot read")
    images_gz.write_bytes(b"garbage that is not gzip at all")
    raises_one_line(build_data, spec, p, match="cannot read")
    images_gz.write_bytes(gzip.compress(struct.pack(">I", 2049) + good[4:]))  # labels magic
    raises_one_line(build_data, spec, p, match="magic number 2049, expected 2051")
    images_gz.write_bytes(gzip.compress(good[:10]))  # header cut short
    raises_one_line(eval_arrays, spec, p, match="header")
    images_gz.unlink()
    raises_one_line(build_data, spec, p, match="no t10k-images-idx3-ubyte.gz")
    # Uncompressed files are accepted too; a count mismatch is reported.
    (fashion_dir / "t10k-images-idx3-ubyte").write_bytes(good)
    assert len(build_data(spec, p).val) == 20
    labels_gz = fashion_dir / "t10k-labels-idx1-ubyte.gz"
    labels_gz.write_bytes(gzip.compress(idx_bytes(np.zeros(19, np.uint8), 2049)))
    raises_one_line(build_data, spec, p, match="20 t10k images but 19 labels")
    labels_gz.write_bytes(gzip.compress(idx_bytes(np.full(20, 10, np.uint8), 2049)))
    raises_one_line(build_data, spec, p, match="labels .* go up to 10")


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason=f"{REAL_FASHION} missing (Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist() -> None:
    images, labels = read_fashion_mnist(REAL_FASHION, "val")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    p = default_preprocess("fashion-mnist")
    bundle = build_data("fashion-mnist", p, limit_train=64, limit_val=64)
    x, _ = eval_arrays("fashion-mnist", p, limit=64)
    np.testing.assert_allclose(x[:8], torch.stack([bundle.val[i][0] for i in range(8)]).numpy(), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# CIFAR, synthetic, limits


def test_cifar_missing_without_download(tmp_path: Path) -> None:
    p = default_preprocess("cifar10:/x")
    raises_one_line(build_data, f"cifar10:{tmp_path / 'none'}", p, match="does not exist.*--download")
    raises_one_line(build_data, f"cifar100:{tmp_path}", p, match=f"{re.escape(str(tmp_path))}.*pass --download")


def test_synthetic() -> None:
    p = default_preprocess("synthetic", image_size=32)
    bundle = build_data("synthetic:10", p)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes, len(bundle.classes)) == (1024, 256, 10, 10)
    x, y = bundle.train[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert torch.equal(build_data("synthetic:10", p).train[5][0], x)  # deterministic
    assert 0.5 < float(torch.stack([bundle.train[i][0] for i in range(64)]).std()) < 1.5
    small = build_data("synthetic", default_preprocess("synthetic", 16), limit_train=8, limit_val=4)
    assert (len(small.train), len(small.val), small.num_classes) == (8, 4, 1000)
    images, labels = eval_arrays("synthetic", default_preprocess("synthetic", 16), limit=4)
    assert images.shape == (4, 3, 16, 16) and labels.dtype == np.int64
    np.testing.assert_array_equal(images[2], small.val[2][0].numpy())


@pytest.mark.parametrize("limit", [0, -3, 1.5, True, "10"])
def test_bad_limits(limit: object) -> None:
    p = default_preprocess("synthetic", 16)
    raises_one_line(build_data, "synthetic", p, limit_train=limit, match="limit_train")
    raises_one_line(build_data, "synthetic", p, limit_val=limit, match="limit_val")
    raises_one_line(eval_arrays, "synthetic", p, limit=limit, match="limit")
