"""Fold, export and verify a reparametrized model into a directory: the conversion half of a run.

Works on any ``nn.Module`` classifier taking one NCHW float input; the caller (a run, the CLI)
knows where the model came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import onnx
from torch import Tensor, nn

from .errors import ParityError
from .export import ExportConfig, export_onnx
from .fold import FoldConfig, FoldResult, fold_model
from .onnx_ranges import check_unit_range, weight_ranges
from .verify import ParityReport, VerifyConfig, make_inputs, verify


@dataclass
class ConversionResult:
    onnx_path: Path
    fold: FoldResult
    parity: ParityReport
    parity_vs_original: ParityReport | None
    onnx_max_abs: float
    onnx_weights: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "certificate": self.fold.certificate(),
            "stored_max_abs": self.fold.max_stored,
            "onnx_weights": {"count": self.onnx_weights, "max_abs": self.onnx_max_abs},
            "parity": self.parity.to_dict(),
            "parity_vs_original": self.parity_vs_original.to_dict() if self.parity_vs_original else None,
            "notes": self.notes,
        }


def convert(model: nn.Module, input_shape: tuple[int, int, int], onnx_path: Path, *,
            fold_config: FoldConfig = FoldConfig(), export_config: ExportConfig = ExportConfig(),
            verify_config: VerifyConfig = VerifyConfig(), original: nn.Module | None = None,
            inputs: Tensor | None = None, check: Callable[[Path], None] | None = None) -> ConversionResult:
    """Fold ``model``, write the float ONNX file ``onnx_path``, check its weight ranges and its parity.

    ``original`` (the model before any scheme) gets its own parity entry: the step-0 deviation,
    which is reported, not enforced, since ``gain='none'`` changes the function on purpose.
    Raises :class:`ParityError` when the export does not match the reparametrized model.
    ``check`` (raising to refuse the file) sees the new file before it replaces the previous one.
    """
    model = model.eval().cpu().float()
    example = example_inputs(input_shape)
    folded = fold_model(model, example, fold_config)
    export_cfg = export_config
    if folded.weight_side_scales:
        export_cfg = replace(export_config, constant_folding=False)
    path = export_onnx(folded.model, example, Path(onnx_path), export_cfg, check)
    ranges = weight_ranges(onnx.load(str(path), load_external_data=True))
    check_unit_range(ranges, str(path))

    x = inputs if inputs is not None else make_inputs(input_shape, verify_config)
    parity = verify(model, x, folded=folded.model, onnx_path=path, config=verify_config)
    vs_original = None
    if original is not None:
        vs_original = verify(original.eval().cpu().float(), x, onnx_path=path, config=verify_config,
                             reference_name="original model (before the scheme)")
    result = ConversionResult(path, folded, parity, vs_original,
                              max((r.max_abs for r in ranges), default=0.0), len(ranges))
    if folded.weight_side_scales:
        result.notes.append("some weights are read directly by their parent module (attention); "
                            "their scale is a weight-side Mul and constant folding was off at export")
    return result


def example_inputs(input_shape: tuple[int, int, int]) -> Tensor:
    """The two inputs the fold probes the model with and the exporter traces."""
    return make_inputs(input_shape, VerifyConfig(samples=2, seed=1234))


def require_parity(result: ConversionResult) -> None:
    if not result.parity.passed:
        raise ParityError("parity failed: " + "; ".join(result.parity.failures()))
