"""Training checkpoints: atomic writes, ``weights_only`` loading, RNG state capture.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that
``torch.load(path, weights_only=True)`` can read it (no pickled Python objects, no numpy arrays).
Writes go to a temporary file in the same directory followed by ``os.replace``: a crash or Ctrl-C
during the write leaves the previous ``last.pt`` intact, never a truncated one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from ...convert.artifacts import atomic_path
from ...convert.errors import UserInputError
from ..files import BEST, LAST, TRAIN_DIR  # noqa: F401 (re-exported)


def train_dir(run_dir: Path) -> Path:
    return Path(run_dir) / TRAIN_DIR


def save_atomic(payload: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` such that readers see either the old or the new file (a
    KeyboardInterrupt drops the partial temporary file and keeps the old checkpoint)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(dict(payload), f)
        f.flush()
        os.fsync(f.fileno())


def link_atomic(source: Path, path: Path) -> None:
    """``path`` becomes the file ``source`` is now, in one rename: a hard link, so no second copy
    takes disk space (the next ``save_atomic`` of ``source`` writes a new file and leaves ``path``
    as it was), or a copy where the file system has no hard links."""
    with atomic_path(path) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"no training checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt or foreign file: one line for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(f"cannot read training checkpoint {path}: {first}") from None


# What a training checkpoint holds and the types ``train(..., resume=True)`` reads them as.
FIELDS = {"model": dict, "optimizer": dict, "scheduler": dict, "epoch": int, "step": int, "best": dict,
          "history": list, "initial": dict, "rng": list}


def check_fields(saved: Any, path: Path) -> dict[str, Any]:
    """``saved`` when it has every field of a training checkpoint with its type; else one line."""
    if not isinstance(saved, dict):
        raise UserInputError(f"training checkpoint {path} is not a dict of fields")
    for key, typ in FIELDS.items():
        if key not in saved:
            raise UserInputError(f"training checkpoint {path} lacks {key!r}")
        if not isinstance(saved[key], typ) or isinstance(saved[key], bool):
            raise UserInputError(f"training checkpoint {path}: {key!r} has the wrong type "
                                 f"({type(saved[key]).__name__})")
    best = saved["best"]
    if not (isinstance(best.get("top1"), (int, float)) and isinstance(best.get("epoch"), int)):
        raise UserInputError(f"training checkpoint {path}: 'best' lacks top1/epoch")
    return saved


def all_finite(state_dict: Mapping[str, Tensor]) -> bool:
    """True when every floating-point tensor of a state dict is finite."""
    for t in state_dict.values():
        if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return False
    return True


def cpu_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU copies: a snapshot that later in-place updates cannot change."""
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else v
            for k, v in state_dict.items()}


# -- RNG ---------------------------------------------------------------------------------------

def capture_rng(device: torch.device | str | None = None) -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain lists."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "cuda": None,
    }
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device | str | None = None) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, mt_state, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in mt_state), gauss))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    dev = torch.device(device) if device is not None else None
    if state.get("cuda") is not None and dev is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), dev)
