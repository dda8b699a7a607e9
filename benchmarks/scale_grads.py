"""The gradient magnitudes behind the ``scales`` group's rule (docs/training.md, issue 23).

For a trained checkpoint, ``channel-max --weight-bits W --weight-range learned --act-bits A``, the
QAT model calibrated as ``finetune`` calibrates it: the loss gradient (cross entropy, label
smoothing 0.1) on a few training batches, per kind of parameter: the activation quantizers'
``log2_scale``, the learned ranges' ``log2_clip`` and the raw weights. Printed: the median and the
90th percentile over parameters of |g| (per element for the weights, whose relative step is what
matters: |g| / rms(W)), and the step one plain SGD update at ``--lr`` makes in octaves.

    .venv/bin/python benchmarks/scale_grads.py runs/peers23/baseline --bits 4,4 --bits 4,8
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch import nn

from wnconvert.convert.actquant.quantizer import ActQuantizer
from wnconvert.convert.apply import apply_scheme, reparametrized
from wnconvert.convert.clip import LearnedClip
from wnconvert.convert.configs import SchemeConfig
from wnconvert.models.data.data import build_data
from wnconvert.models.run.rundir import RunDir
from wnconvert.models.train.act_run import ActSettings, calibration_batches, prepare_act_model
from wnconvert.models.zoo.zoo import build_model


def quantiles(values: list[float]) -> str:
    v = sorted(values)
    return f"median {statistics.median(v):.2e}, p90 {v[int(0.9 * (len(v) - 1))]:.2e}"


def measure(run: Path, wbits: int, abits: int, batches: int, batch_size: int, lr: float) -> None:
    manifest = RunDir(run).manifest()
    torch.manual_seed(0)
    model = build_model(manifest.model, str(run / "checkpoint.safetensors"), manifest.num_classes).model
    apply_scheme(model, SchemeConfig("channel-max", weight_bits=wbits, weight_range="learned"))
    data = build_data(manifest.data, manifest.preprocess, limit_train=batches * batch_size, limit_val=16)
    qat = prepare_act_model(model, ActSettings(abits), calibration_batches(data.train, batch_size)).train()
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch_size, shuffle=False)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    grads: dict[str, list[float]] = {"log2_scale (activations)": [], "log2_clip (weights)": [],
                                     "raw weight, per element": [], "raw weight, |g|/rms(W)": []}
    for i, (x, y) in enumerate(loader):
        if i == batches:
            break
        qat.zero_grad()
        loss_fn(qat(x), y).backward()
        for m in qat.modules():
            if isinstance(m, ActQuantizer) and m.log2_scale.grad is not None:
                grads["log2_scale (activations)"].append(float(m.log2_scale.grad.abs()))
            if isinstance(m, LearnedClip) and m.log2_clip.grad is not None:
                grads["log2_clip (weights)"].extend(m.log2_clip.grad.abs().tolist())
        for _, module, _ in reparametrized(qat):
            w = module.parametrizations.weight.original
            if w.grad is not None:
                g = float(w.grad.abs().mean())
                grads["raw weight, per element"].append(g)
                grads["raw weight, |g|/rms(W)"].append(g / float(w.detach().square().mean().sqrt()))
    print(f"\nW{wbits}A{abits}, {batches} batches of {batch_size}, {run}")
    for name, v in grads.items():
        if not v:
            continue
        step = f"; one SGD step at lr {lr:g}: {lr * statistics.median(v):.1e}" if "log2" in name else ""
        print(f"  {name:28s} {quantiles(v)}{step}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run directory whose checkpoint is the trained network")
    ap.add_argument("--bits", action="append", default=None, help="W,A (repeatable; default 4,4 and 4,8)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    for spec in a.bits or ["4,4", "4,8"]:
        w, act = (int(s) for s in spec.split(","))
        measure(a.run, w, act, a.batches, a.batch_size, a.lr)


if __name__ == "__main__":
    main()
