"""JPEG ImageFolder input pipeline: CPU PIL workers vs GPU (nvjpeg) decode, images/s.

Builds an ImageFolder of realistic JPEGs (500x375, quality 90, ~100 KB: smooth random fields plus
noise; a few grayscale and CMYK files, as in ImageNet) in a temporary directory, or uses --root,
then measures ready batches on the device:

  cpu-pil      build_data("imagefolder:...") with PIL transforms, DataLoader(--workers, pinned memory)
  gpu-decode   build_data(..., gpu_decode=True): file-bytes loader + GpuBatchTransform on the device,
               a batch ahead in a background thread (models.data.gpu_decode.device_batches, as train() runs it)

With --train, a training step (ResNet-50, bf16 autocast, channels_last, SGD with momentum, loss read
every step like the engine) consumes each feed, and the same step on synthetic on-device data is the
reference. The issue's target: train + gpu-decode >= 0.9 x train + synthetic on one H100.

    python benchmarks/jpeg_pipeline.py --device cuda --train                     # 16 workers, batch 256
    python benchmarks/jpeg_pipeline.py --device cpu --num-images 64 --batch 16   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from wnconvert.models.data.data import Preprocess, build_data, default_preprocess
from wnconvert.models.data.gpu_decode import collate_encoded, decode_batch, device_batches

TARGET = 0.9
Batch = tuple[torch.Tensor, torch.Tensor]


# -- data set -----------------------------------------------------------------------------------

def _field(rng: np.random.Generator, grid: tuple[int, int], size: tuple[int, int], amp: float) -> np.ndarray:
    """A random colour grid upsampled (bicubic) to ``size`` (w, h): smooth structure at one scale."""
    g = rng.integers(0, 256, (*grid, 3), dtype=np.uint8)
    return (np.asarray(Image.fromarray(g).resize(size, Image.Resampling.BICUBIC), np.float32) - 128) * amp


def _write_image(job: tuple[Path, int, int, int, int, int]) -> int:
    path, index, seed, width, height, quality = job
    rng = np.random.default_rng([seed, index])
    size = (width, height)
    # Gradients at three scales plus luma and chroma noise: q90 files of ~100 KB at 500x375,
    # like ImageNet's photos (smooth fills compress to a few KB and would flatter the decoders).
    pixels = (128 + _field(rng, (4, 5), size, 0.8) + _field(rng, (16, 20), size, 0.8)
              + _field(rng, (64, 80), size, 0.4)
              + 14 * rng.standard_normal((height, width, 1), np.float32)
              + 7 * rng.standard_normal((height, width, 3), np.float32))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if index % 64 == 63:
        image = image.convert("L")  # ~1.5% grayscale, decoded on the CPU
    elif index % 1000 == 999:
        image = image.convert("CMYK")  # rare CMYK, decoded on the CPU
    image.save(path, "JPEG", quality=quality)
    return path.stat().st_size


def make_image_folder(root: Path, n: int, classes: int, width: int, height: int, quality: int,
                      seed: int = 0) -> list[int]:
    """root/{train,val}/class_XX/*.jpg: n train images, one val image per class. File sizes."""
    jobs = []
    for split, count in (("train", n), ("val", classes)):
        for c in range(classes):
            (root / split / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
        offset = 0 if split == "train" else n
        jobs += [(root / split / f"class_{i % classes:02d}" / f"{i:06d}.jpg", offset + i, seed,
                  width, height, quality) for i in range(count)]
    with Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        return pool.map(_write_image, jobs, chunksize=16)[:n]


# -- feeds and timing ---------------------------------------------------------------------------

def endless(epoch: Callable[[], Iterable[Batch]]) -> Iterator[Batch]:
    """Batches across as many epochs as the measurement needs."""
    while True:
        batches = epoch()
        try:
            yield from batches
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(batches: Iterator[Batch], consume: Callable[[torch.Tensor, torch.Tensor], Any],
            args: argparse.Namespace, device: torch.device) -> float:
    """images/s of ``consume`` over ``args.steps`` batches, after ``args.warmup`` untimed ones."""
    try:
        for _ in range(args.warmup):
            consume(*next(batches))
        sync(device)
        t0 = time.perf_counter()
        images = 0
        for _ in range(args.steps):
            x, y = next(batches)
            consume(x, y)
            images += x.shape[0]
        sync(device)
        return images / (time.perf_counter() - t0)
    finally:
        batches.close()  # type: ignore[attr-defined]


def loader(dataset: Any, args: argparse.Namespace, device: torch.device, collate: Any = None) -> DataLoader:
    return DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                      pin_memory=device.type == "cuda", drop_last=True, collate_fn=collate,
                      persistent_workers=args.workers > 0)


def cpu_feed(spec: str, p: Preprocess, args: argparse.Namespace, device: torch.device) -> Iterator[Batch]:
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    dl = loader(build_data(spec, p).train, args, device)

    def epoch() -> Iterator[Batch]:
        for x, y in dl:
            yield x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)

    return endless(epoch)


def gpu_feed(spec: str, p: Preprocess, args: argparse.Namespace, device: torch.device) -> Iterator[Batch]:
    bundle = build_data(spec, p, gpu_decode=True)
    dl = loader(bundle.train, args, device, collate=bundle.gpu_transform.collate)
    return endless(lambda: device_batches(dl, bundle.gpu_transform, device, train=True))


def synthetic_feed(args: argparse.Namespace, device: torch.device) -> Iterator[Batch]:
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch,), device=device)

    def forever() -> Iterator[Batch]:
        while True:
            yield x, y

    return forever()


def train_step(args: argparse.Namespace,
               device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], float]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=1000).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())  # a host sync per step, as models/train/train.py does

    return step


def nvjpeg_check(spec: str, p: Preprocess, device: torch.device, n: int = 64) -> str:
    """nvjpeg vs libjpeg on the same files: mean and max |difference| in grey levels."""
    dataset = build_data(spec, p, gpu_decode=True).train
    batch, _ = collate_encoded([dataset[i] for i in range(min(n, len(dataset)))])
    gpu = decode_batch(batch, device)
    cpu = decode_batch(batch, torch.device("cpu"))
    diffs = [(g.cpu().int() - c.int()).abs() for g, c in zip(gpu, cpu)]
    mean = float(torch.cat([d.flatten() for d in diffs]).float().mean())
    return f"nvjpeg vs libjpeg decode on {len(diffs)} files: mean |diff| {mean:.3f}, " \
           f"max {max(int(d.max()) for d in diffs)} grey levels"


# -- main ---------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path,
                    help="existing ImageFolder (ROOT/train, ROOT/val); default: generate one")
    ap.add_argument("--num-images", type=int,
                    help="train images to generate (default: enough for warmup + steps)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--keep", action="store_true", help="keep the generated folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=8, help="untimed batches per measurement")
    ap.add_argument("--steps", type=int, default=30, help="timed batches per measurement")
    ap.add_argument("--train", action="store_true", help="also measure a training step fed by each path")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--skip-cpu", action="store_true", help="skip the CPU PIL path")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else 0)
        torch.cuda.set_device(device)
    elif args.workers > 0:
        # On CPU the loader workers occupy the cores: intra-op threads on top of them stall in
        # OpenMP barriers and make the in-process decode path look ~10x slower than it is.
        torch.set_num_threads(1)

    tmp = None
    root = args.root
    if root is None:
        n = args.num_images or (args.warmup + args.steps + 1) * args.batch
        tmp = Path(tempfile.mkdtemp(prefix="jpeg_pipeline_"))
        root = tmp
        t0 = time.perf_counter()
        sizes = make_image_folder(root, n, args.classes, args.width, args.height, args.quality)
        print(f"generated {n} JPEGs ({args.width}x{args.height}, q{args.quality}, mean "
              f"{np.mean(sizes) / 1000:.0f} KB) in {root} in {time.perf_counter() - t0:.1f}s", flush=True)
    spec = f"imagefolder:{root}"
    p = default_preprocess(spec, image_size=args.image_size)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", batch {args.batch}, {args.workers} workers, {args.warmup}+{args.steps} batches per row",
          flush=True)
    if device.type == "cuda":
        print(nvjpeg_check(spec, p, device), flush=True)

    feeds: dict[str, Callable[[], Iterator[Batch]]] = {}
    if not args.skip_cpu:
        feeds[f"cpu-pil ({args.workers} workers)"] = lambda: cpu_feed(spec, p, args, device)
    feeds[f"gpu-decode ({args.workers} workers)"] = lambda: gpu_feed(spec, p, args, device)
    rows: list[dict] = []
    try:
        step = train_step(args, device) if args.train else None
        if step is not None:
            ips = measure(synthetic_feed(args, device), step, args, device)
            rows.append({"feed": "synthetic (on device)", "feed_ips": None, "train_ips": ips})
            print(f"train + synthetic: {ips:.1f} img/s", flush=True)
        for name, make in feeds.items():
            feed_ips = measure(make(), lambda x, y: None, args, device)
            print(f"{name}: {feed_ips:.1f} img/s (batches ready on the device)", flush=True)
            row = {"feed": name, "feed_ips": feed_ips, "train_ips": None}
            if step is not None:
                row["train_ips"] = measure(make(), step, args, device)
                print(f"train + {name}: {row['train_ips']:.1f} img/s", flush=True)
            rows.append(row)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    reference = rows[0]["train_ips"] if args.train else None
    for row in rows:
        row["vs_synthetic"] = row["train_ips"] / reference if reference else None
    if args.json:
        settings = {k: str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"device": str(device), "args": settings, "rows": rows}, indent=2))
    print()
    print(f"{'feed':32s} {'feed img/s':>11s} {'train img/s':>12s} {'vs synthetic':>13s}")
    for row in rows:
        cells = [f"{row['feed_ips']:.1f}" if row["feed_ips"] else "-",
                 f"{row['train_ips']:.1f}" if row["train_ips"] else "-",
                 f"{row['vs_synthetic']:.2f}" if row["vs_synthetic"] else "-"]
        print(f"{row['feed']:32s} {cells[0]:>11s} {cells[1]:>12s} {cells[2]:>13s}")
    if reference:
        ratio = rows[-1]["vs_synthetic"]
        verdict = ("PASS" if ratio >= TARGET else "FAIL") if device.type == "cuda" else \
            "(the target is for CUDA; on CPU decoding competes with the step for the cores)"
        print(f"target train + gpu-decode >= {TARGET} x synthetic: {ratio:.2f} {verdict}")


if __name__ == "__main__":
    main()
