"""fp32 ONNX export of a plain (folded) model. Knows nothing of schemes.

Exporter choices, each checked by a test:

* the TorchScript-based exporter (``dynamo=False``): the dynamo exporter's default optimizer
  rewrites Conv+BatchNormalization into one Conv and folds constant Muls into weights, which would
  silently undo the [-1, 1] storage;
* ``training=PRESERVE`` with the model in eval mode: ``EVAL`` runs the exporter's eval peephole,
  which also fuses BatchNorm into the preceding Conv weight;
* the fused ``nn.MultiheadAttention`` fast path off: it has no ONNX symbolic;
* adaptive average pools whose input size is not a multiple of their output size replaced by
  an exact fixed-size equivalent (:mod:`.export_compat`);
* constant folding on, unless the model carries weight-side scales (``Mul(stored, scale)`` feeding
  a MatMul), which folding would multiply back into one out-of-range tensor.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import Tensor, nn

from .artifacts import ensure_writable_dir
from .errors import WnError
from .export_compat import make_exportable

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18
    dynamic_batch: bool = True
    constant_folding: bool = True


class ExportError(WnError):
    exit_code = 6


def export_onnx(model: nn.Module, example_input: Tensor, path: Path,
                config: ExportConfig = ExportConfig(), check: Callable[[Path], None] | None = None) -> Path:
    """Export ``model`` (eval mode, CPU, fp32) to ``path`` atomically and check the file;
    ``check`` (raising to refuse the file) sees it before it replaces ``path``."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    model = model.eval().cpu().float()
    x = example_input.detach().cpu().float()
    model = make_exportable(model, x)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent) as tmp:
        tmp_file = Path(tmp) / path.name
        fastpath = torch.backends.mha.get_fastpath_enabled()
        try:
            torch.backends.mha.set_fastpath_enabled(False)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model, (x,), str(tmp_file),
                    dynamo=False,
                    training=torch.onnx.TrainingMode.PRESERVE,
                    do_constant_folding=config.constant_folding,
                    opset_version=config.opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
                    if config.dynamic_batch else None,
                )
            onnx.checker.check_model(str(tmp_file))
        except Exception as e:  # the exporter raises many types; report one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"ONNX export failed: {first}") from e
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        if check is not None:
            check(tmp_file)
        # Large models come with external-data files: move those first, the model file last.
        for f in sorted(Path(tmp).iterdir(), key=lambda f: f.name == path.name):
            shutil.move(str(f), str(path.parent / f.name))
    return path
