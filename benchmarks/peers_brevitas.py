"""Brevitas QAT as a peer of wnconvert's ``--act-bits`` fine-tunes (benchmarks/peers.py).

Brevitas's standard graph flow, as its documentation and examples use it: ``preprocess_for_quantize``
(torch.fx trace, BatchNorm merged into the convs) then ``quantize`` with its stock quantizers at the
asked bit widths: per-channel float-scale weights (``Int8WeightPerChannelFloat``), per-tensor float
activations (``Uint8ActPerTensorFloat`` after ReLU, ``Int8ActPerTensorFloat`` elsewhere, the input
and residual adds included), int32 biases. The activation ranges are calibrated on the same 4
training batches wnconvert calibrates on (``calibration_mode``), then the model is trained by
wnconvert's own training loop (``wnconvert.models.train.train.train``: same data subset, augmentation,
optimizer, schedule, epochs and seed as the wnconvert fine-tune it is compared with) and exported
with Brevitas's ONNX QCDQ export (QuantizeLinear -> Clip -> DequantizeLinear; the Clip narrows 8-bit
storage to 4 bits).

This module imports brevitas: only peers.py imports it, after checking the ``bench`` extra.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from brevitas.export import export_onnx_qcdq
from brevitas.graph.calibrate import calibration_mode
from brevitas.graph.quantize import (
    COMPUTE_LAYER_MAP,
    QUANT_ACT_MAP,
    QUANT_IDENTITY_MAP,
    preprocess_for_quantize,
    quantize,
)
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat
from torch import nn

from wnconvert.models.data.data import build_data
from wnconvert.models.run.rundir import RunDir
from wnconvert.models.train.act_run import calibration_batches
from wnconvert.models.train.train import TrainConfig, train
from wnconvert.models.zoo.zoo import build_model

ONNX_NAME = "model.qcdq.onnx"


def quant_maps(weight_bits: int, act_bits: int) -> tuple[dict, dict, dict]:
    """Brevitas's default maps with the stock quantizers set to the asked bit widths."""
    weight = Int8WeightPerChannelFloat.let(bit_width=weight_bits)
    signed = Int8ActPerTensorFloat.let(bit_width=act_bits)
    unsigned = Uint8ActPerTensorFloat.let(bit_width=act_bits)
    layers = {}
    for cls, entry in COMPUTE_LAYER_MAP.items():
        if entry is not None and cls in (nn.Conv2d, nn.Linear):
            entry = (entry[0], {**entry[1], "weight_quant": weight})
        layers[cls] = entry
    acts = dict(QUANT_ACT_MAP)
    acts[nn.ReLU] = (acts[nn.ReLU][0], {**acts[nn.ReLU][1], "act_quant": unsigned})
    identity = {"signed": (QUANT_IDENTITY_MAP["signed"][0], {**QUANT_IDENTITY_MAP["signed"][1], "act_quant": signed}),
                "unsigned": (QUANT_IDENTITY_MAP["unsigned"][0],
                             {**QUANT_IDENTITY_MAP["unsigned"][1], "act_quant": unsigned})}
    return layers, acts, identity


def brevitas_model(model: nn.Module, weight_bits: int, act_bits: int) -> nn.Module:
    layers, acts, identity = quant_maps(weight_bits, act_bits)
    graph = preprocess_for_quantize(model.eval())
    return quantize(graph, quant_identity_map=identity, compute_layer_map=layers, quant_act_map=acts)


def brevitas_run(baseline: Path, out: Path, weight_bits: int, act_bits: int, cfg: TrainConfig,
                 limit_train: int | None, limit_val: int | None, train_missing: bool = True) -> Path | None:
    """Fine-tune the baseline under Brevitas QAT with ``cfg`` (the settings the wnconvert fine-tune
    resolves to) on the baseline's data and preprocessing; returns the exported ONNX file.
    Reused when ``out`` already holds it for the same settings; None when it does not and
    ``train_missing`` is false."""
    manifest = RunDir(baseline).manifest()
    settings = {"baseline": str(baseline), "weight_bits": weight_bits, "act_bits": act_bits,
                "train": cfg.to_dict(), "limit_train": limit_train, "limit_val": limit_val}
    done = out / "settings.json"
    if (out / ONNX_NAME).exists() and done.exists() and json.loads(done.read_text()) == settings:
        print(f"# reusing {out / ONNX_NAME}", flush=True)
        return out / ONNX_NAME
    if not train_missing:
        return None
    out.mkdir(parents=True, exist_ok=True)
    (out / ONNX_NAME).unlink(missing_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_model(manifest.model, str(baseline / "checkpoint.safetensors"), manifest.num_classes).model
    data = build_data(manifest.data, manifest.preprocess, limit_train=limit_train, limit_val=limit_val)
    qmodel = brevitas_model(model, weight_bits, act_bits)
    with torch.no_grad(), calibration_mode(qmodel):
        for x in calibration_batches(data.train, cfg.batch_size):
            qmodel(x)
    print(f"# Brevitas W{weight_bits}A{act_bits}: training {out}", flush=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    train(qmodel, data, cfg, out)
    qmodel.eval()
    size = manifest.preprocess.image_size
    # The TorchScript exporter: Brevitas's dynamo QCDQ export refuses quantized (int32) biases.
    export_onnx_qcdq(qmodel.cpu(), args=torch.zeros(1, 3, size, size), export_path=str(out / ONNX_NAME),
                     input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}},
                     dynamo=False)
    done.write_text(json.dumps(settings, indent=1) + "\n")
    return out / ONNX_NAME
