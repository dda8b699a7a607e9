"""Activation quantization-aware training and its lossless QDQ export (see docs/actquant.md)."""

from .bitexact import BitExactReport, LayerCheck, check_bit_exact
from .export_qdq import ExportInfo, export_qdq
from .layers import DeployedParts, QLayer, deployed_parts
from .lossless import check_lossless_activations
from .prepare import (
                      QuantPoint,
                      act_config,
                      act_points,
                      activation_diagnostics,
                      calibrate,
                      freeze_bn,
                      prepare_qat,
                      qlayers,
                      quantizers,
)
from .quantizer import ActQuantConfig, ActQuantizer

__all__ = ["ActQuantConfig", "ActQuantizer", "BitExactReport", "DeployedParts", "ExportInfo", "LayerCheck",
           "QLayer", "QuantPoint", "act_config", "act_points", "activation_diagnostics", "calibrate",
           "check_bit_exact", "check_lossless_activations", "deployed_parts", "export_qdq", "freeze_bn",
           "prepare_qat", "qlayers", "quantizers"]
