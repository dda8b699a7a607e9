"""Comparing logits and weights: the one definition of each metric wnconvert reports.

* ``max_abs``: max |candidate − reference|; ``rel``: max_abs / max |reference|
* ``cosine``: per-sample cosine similarity of the logit vectors (an all-zero vector is 1 against
  itself, 0 against anything else)
* ``top1_agreement``: fraction of samples whose arg-max agrees
* ``sqnr_db``: 10·log10(Σ ref² / Σ (candidate − ref)²), ∞ when they are equal, −∞ for a zero
  reference and a non-zero candidate
"""

from __future__ import annotations

import numpy as np

from .errors import UserInputError


def as_rows(a) -> np.ndarray:
    """Float64 ``(samples, -1)``."""
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(len(a), -1)


def max_errors(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """``(max_abs, rel)``."""
    diff = np.abs(out - ref)
    max_abs = float(diff.max()) if diff.size else 0.0
    denom = float(np.abs(ref).max()) if ref.size else 0.0
    rel = max_abs / denom if denom > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, rel


def cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two ``(samples, k)`` arrays."""
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    dots = (ref * out).sum(axis=1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0),
                    np.where(np.linalg.norm(ref - out, axis=1) == 0, 1.0, 0.0))


def top1_agreement(ref: np.ndarray, out: np.ndarray) -> float:
    return float((ref.argmax(1) == out.argmax(1)).mean()) if ref.size else 1.0


def sqnr_db(reference, candidate) -> float:
    """10·log10(signal / noise) in dB; ∞ when ``candidate`` equals ``reference``."""
    ref = np.asarray(reference, np.float64)
    noise = float(((np.asarray(candidate, np.float64) - ref) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0:
        return float("inf")
    return 10.0 * float(np.log10(signal / noise)) if signal > 0 else float("-inf")


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Top-1 agreement, per-sample cosine (mean and min), SQNR in dB, max abs / relative error."""
    ref, out = as_rows(reference), as_rows(candidate)
    if ref.shape != out.shape:
        raise UserInputError(f"logit shapes differ: {ref.shape} vs {out.shape}")
    max_abs, rel = max_errors(ref, out)
    cos = cosines(ref, out)
    return {"samples": int(len(ref)), "top1_agreement": top1_agreement(ref, out),
            "cosine_mean": float(cos.mean()) if cos.size else 1.0,
            "cosine_min": float(cos.min()) if cos.size else 1.0,
            "sqnr_db": sqnr_db(ref, out), "max_abs": max_abs, "rel": rel}


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int = 5) -> tuple[int, int]:
    """``(top-1 correct, top-k correct)`` counts of a batch of logits. Equal logits (frequent on a
    low-bit grid) rank by class index, lowest first, as ``argmax`` does; training's validation
    uses the same rule (models/train/batches.py), so a run's recorded top-1 is what ``eval`` measures."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return int((order[:, 0] == labels).sum()), int((order == labels[:, None]).any(axis=1).sum())
