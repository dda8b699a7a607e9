"""``verify`` of a power-of-two run's deployed files under the **bit-exact** contract
(``convert/actquant/bitexact.py``): the run's eval-mode fake-quant model, the integer reference and
onnxruntime (optimizations off and on) must hold the same integers at every quantized tensor.

A run trained with ``--scale-format po2`` (``manifest.act.scale_format``) has every scale a power
of two, so its ``model.int8.onnx`` / ``model.int4.onnx`` are judged by this contract instead of the
lossless-activations one; a file whose export entry in report.json already names the contract is
judged by it whatever the manifest says.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wnconvert.convert.actquant import check_bit_exact
from wnconvert.convert.actquant.bitexact import CONTRACT

from .act_files import CONTRACT as ACT_CONTRACT
from .rundir import Manifest, RunDir


def judged_bit_exact(manifest: Manifest, entry: dict) -> bool:
    """Whether the run's own file with export entry ``entry`` is checked under the bit-exact contract."""
    contract = entry.get("contract")
    return contract == CONTRACT or (contract == ACT_CONTRACT and manifest.po2)


def verify_bitexact_file(run_dir: Path, path: Path, x: torch.Tensor, inputs: str) -> dict:
    """:func:`check_bit_exact` of ``path`` against the run's QAT model on images ``x``; the dict
    written to ``report.json["verify"]["quantized"][precision]``: contract, inputs, passed,
    failures (the first differing layer first), first_difference and the per-layer table."""
    _, qat = RunDir(run_dir).load_qat()
    return check_bit_exact(qat, path, x).to_dict() | {"inputs": inputs}
