"""Parity: does a folded PyTorch model and its ONNX file compute what the reference computes?

The reference is evaluated in float64 (a copy, on the CPU) so that its own rounding does not hide
or fake differences. Each candidate is compared on the same inputs by

* ``max_abs``: max |candidate - reference|
* ``rel``:     max_abs / max |reference|
* ``cosine``:  the smallest per-sample cosine similarity of the logit vectors
* ``top1``:    fraction of samples whose arg-max agrees

ONNX files run in onnxruntime twice: with graph optimizations disabled (the file as written) and
with all of them enabled (what a deployment runs). Knows nothing of schemes.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .configs import VerifyConfig  # noqa: F401 (re-exported)
from .errors import UserInputError
from .metrics import as_rows, cosines, max_errors, top1_agreement
from .runtime import MATMULNBITS_EXACT, PROVIDERS, ort_session, run_onnx  # noqa: F401 (re-exported)


@dataclass
class Comparison:
    max_abs: float
    rel: float
    cosine: float
    top1: float
    passed: bool = True


@dataclass
class ParityReport:
    reference: str
    inputs: str
    config: VerifyConfig
    candidates: dict[str, Comparison] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.candidates.values())

    def failures(self) -> list[str]:
        return [f"{name}: rel={c.rel:.3g} cosine={c.cosine:.8f} top1={c.top1:.4f}"
                for name, c in self.candidates.items() if not c.passed]

    def to_dict(self) -> dict:
        return {
            "reference": self.reference,
            "inputs": self.inputs,
            "thresholds": asdict(self.config),
            "candidates": {k: asdict(v) for k, v in self.candidates.items()},
            "passed": self.passed,
        }


def compare(reference: np.ndarray, candidate: np.ndarray, config: VerifyConfig) -> Comparison:
    ref, out = as_rows(reference), as_rows(candidate)
    if ref.shape != out.shape:
        return Comparison(float("inf"), float("inf"), 0.0, 0.0, passed=False)
    max_abs, rel = max_errors(ref, out)
    cos = cosines(ref, out)
    cosine = float(cos.min()) if cos.size else 1.0
    top1 = top1_agreement(ref, out)
    ok = (np.isfinite(out).all() and rel <= config.rtol and cosine >= config.min_cosine
          and top1 >= config.min_top1)
    return Comparison(max_abs, rel, cosine, top1, bool(ok))


def make_inputs(shape: tuple[int, ...], config: VerifyConfig) -> Tensor:
    """Standard-normal inputs: the model input is already normalized, so this is its scale."""
    g = torch.Generator().manual_seed(config.seed)
    return torch.randn((config.samples, *shape), generator=g)


def load_inputs(path: Path, shape: tuple[int, ...]) -> Tensor:
    try:
        arr = np.load(path)
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot read inputs {path}: {e}") from None
    if arr.ndim != len(shape) + 1 or tuple(arr.shape[1:]) != tuple(shape):
        raise UserInputError(f"inputs {path} have shape {arr.shape}, expected (N, {', '.join(map(str, shape))})")
    return torch.from_numpy(arr.astype(np.float32))


@torch.no_grad()
def run_torch(model: nn.Module, x: Tensor, dtype: torch.dtype = torch.float32) -> np.ndarray:
    m = copy.deepcopy(model).cpu().to(dtype).eval()
    out = m(x.cpu().to(dtype))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.numpy()


def verify(reference: nn.Module, x: Tensor, *, folded: nn.Module | None = None,
           onnx_path: Path | None = None, config: VerifyConfig = VerifyConfig(),
           reference_name: str = "reparametrized model", inputs_name: str = "") -> ParityReport:
    ref = run_torch(reference, x, torch.float64)
    report = ParityReport(f"{reference_name}, float64", inputs_name or f"{len(x)} samples", config)
    if folded is not None:
        report.candidates["folded-torch-fp32"] = compare(ref, run_torch(folded, x), config)
    if onnx_path is not None:
        xs = x.cpu().float().numpy()
        report.candidates["onnx-ort-no-opt"] = compare(ref, run_onnx(onnx_path, xs, optimized=False), config)
        report.candidates["onnx-ort-opt"] = compare(ref, run_onnx(onnx_path, xs, optimized=True), config)
    return report
