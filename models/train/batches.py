"""Batches for the training loop: the epoch sampler (seeded, sharded, resumable mid-epoch),
validation loaders, device transfer (with optional GPU decode), and evaluation summed over ranks."""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from typing import Any, Generator, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from ..data.gpu_decode import device_batches
from . import distributed as dist_utils

# -- evaluation --------------------------------------------------------------------------------

def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def logits(out: Any) -> Tensor:
    # torchvision's Inception/GoogLeNet return (logits, aux...) namedtuples in train mode.
    return out if isinstance(out, Tensor) else out[0]


def ranked(out: Tensor, k: int) -> Tensor:
    """The ``k`` best classes per row, equal logits by class index (lowest first), the rule of
    ``convert.metrics.topk_correct`` that ``eval`` uses. ``topk`` breaks ties arbitrarily: on the
    4-bit logit grid of a W4A4 run that moved the recorded top-1 by 0.7 points (issue 22, item 0b)."""
    return torch.sort(out, dim=1, descending=True, stable=True).indices[:, :k]


@torch.no_grad()
def evaluate_loader(forward: nn.Module, module: nn.Module, loader: DataLoader, device: torch.device,
                     amp: bool, channels_last: bool, gpu_transform: Any = None) -> dict:
    """Loss sum, top-1/top-5 hits and image count over this rank's loader, summed over ranks.

    ``forward`` runs the batches (maybe compiled); ``module`` is the plain model whose train/eval
    flag is switched. Sums stay on the device so there is one host sync per call, not per batch.
    """
    was_training = module.training
    module.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    images = 0
    fmt = torch.channels_last if channels_last else torch.preserve_format
    batches = device_batches_of(loader, gpu_transform, device, train=False)
    try:
        for x, y in batches:
            images += y.numel()
            x = x.to(device, non_blocking=True, memory_format=fmt)
            y = y.to(device, non_blocking=True)
            with autocast(device, amp):
                out = logits(forward(x))
            out = out.float()
            hits = ranked(out, min(5, out.shape[1])) == y[:, None]
            sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                                 hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
    finally:
        batches.close()
        module.train(was_training)
    totals = torch.cat([sums, torch.tensor([float(images)], dtype=torch.float64, device=device)])
    dist_utils.all_reduce_sum(totals)
    loss, top1, top5, n = totals.tolist()
    if n == 0:
        return {"val_loss": math.nan, "val_top1": math.nan, "val_top5": math.nan, "images": 0}
    return {"val_loss": loss / n, "val_top1": top1 / n, "val_top5": top5 / n, "images": int(n)}


def make_val_loader(dataset: Dataset, batch_size: int, device: torch.device, workers: int,
                persistent: bool = False, gpu_transform: Any = None) -> DataLoader:
    d = dist_utils.info()
    if d.enabled:  # strided shard without padding: the reduced count is exactly len(dataset)
        dataset = Subset(dataset, dist_utils.shard(len(dataset), d.rank, d.world_size))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=persistent and workers > 0,
                      collate_fn=collate(gpu_transform))


def collate(gpu_transform: Any) -> Any:
    # GPU decode (models/data/gpu_decode.py): batches are lists of encoded bytes, not stacked tensors.
    return None if gpu_transform is None else gpu_transform.collate


def device_batches_of(loader: DataLoader, gpu_transform: Any, device: torch.device, *,
                    train: bool) -> Generator[tuple[Tensor, Tensor], None, None]:
    """The loader's batches; with GPU decode, decoded and augmented on ``device`` (a batch ahead,
    in a background thread, on CUDA). Close it when leaving the loop early."""
    if gpu_transform is None:
        return (batch for batch in loader)
    return device_batches(loader, gpu_transform, device, train=train)


def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256,
             device: str | torch.device = "cpu", workers: int = 0, amp: bool = False,
             gpu_transform: Any = None) -> dict:
    """``{"val_loss", "val_top1", "val_top5", "images"}`` of ``model`` (already on ``device``).

    Accuracies are fractions, the loss is plain cross entropy. Under an initialized process group
    each rank evaluates a disjoint shard and the results are summed over all ranks. Pass the
    bundle's ``gpu_transform`` with the ``val`` of a ``build_data(..., gpu_decode=True)`` bundle.
    """
    dev = torch.device(device)
    loader = make_val_loader(dataset, batch_size, dev, workers, gpu_transform=gpu_transform)
    return evaluate_loader(model, model, loader, dev, amp, channels_last=False,
                            gpu_transform=gpu_transform)


class EpochSampler(Sampler[tuple[int, int]]):
    """This rank's share of a seeded shuffle (same permutation on every rank for a given epoch),
    optionally without its first ``skip`` batches when resuming mid-epoch. It yields
    ``(epoch, index)`` keys for :class:`SeededSamples`."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int, batch_size: int) -> None:
        self.base = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                       seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.skip = 0
        self.epoch = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.epoch = epoch
        self.skip = skip_batches * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in itertools.islice(iter(self.base), self.skip, None))

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


class SeededSamples(Dataset):
    """The training set, each batch's random augmentation drawn from a generator seeded by
    ``(seed, epoch, first index of the batch)`` instead of the process's stream.

    So a batch is augmented the same way whichever process makes it: in the main process or in
    any of any number of DataLoader workers, in an uninterrupted run or after a mid-epoch resume.
    The caller's global RNG states (torch, ``random``) are left as they were."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _seeded(self, epoch: int, index: int) -> contextlib.AbstractContextManager:
        return _seeded_rng((self.seed * 1_000_003 + epoch) * 4_294_967_311 + index)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with self._seeded(epoch, index):
            return self.dataset[index]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        indices = [i for _, i in keys]
        with self._seeded(keys[0][0], indices[0]):
            many = getattr(self.dataset, "__getitems__", None)
            return many(indices) if many is not None else [self.dataset[i] for i in indices]


@contextlib.contextmanager
def _seeded_rng(seed: int):
    torch_state, py_state = torch.random.get_rng_state(), random.getstate()
    torch.manual_seed(seed % 2**63)
    random.seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_state)
        random.setstate(py_state)
