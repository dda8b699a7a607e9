"""Cost of ``--diagnostics K``: time of a training step with and without the collector.

ResNet-18 (layer-max, SGD momentum + decay, as ``models.train.train`` builds it) on random 32x32 images.
Every step is timed in parts, in the same process: forward+backward+``optimizer.step()`` (the
step) and ``Diagnostics.before_step`` + ``after_step`` (the collector, run on every step here, i.e.
K = 1). Both are measured as process CPU time and as wall time: on a shared, loaded machine the
wall time of either part swings by several x from one step to the next, CPU time much less.
The cost at logging interval K is ``1 + collector / (K * step)``.

    python benchmarks/diagnostics_overhead.py                      # CPU, 12 steps, batch 32
    python benchmarks/diagnostics_overhead.py --device cuda --batch 128 --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.models.train.diagnostics import Diagnostics
from wnconvert.models.train.optim import build_optimizer
from wnconvert.models.zoo.zoo import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = build_model("resnet18", "none", 10).model
    apply_scheme(model, SchemeConfig("layer-max"))
    model.to(dev).train()
    opt = build_optimizer(model, "sgd", lr=0.01, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(dev)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(dev)
    with tempfile.TemporaryDirectory() as d:
        diag = Diagnostics(model, opt, 1, Path(d), optimizer_name="sgd", momentum=0.9)
        cpu_step, cpu_diag, wall_step, wall_diag = [], [], [], []
        for i in range(args.steps + 2):  # two warm-up steps
            c0, w0 = time.process_time(), time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            sync()
            c1, w1 = time.process_time(), time.perf_counter()
            diag.before_step(i + 1, 1, 0.01)
            sync()
            c2, w2 = time.process_time(), time.perf_counter()
            opt.step()
            sync()
            c3, w3 = time.process_time(), time.perf_counter()
            diag.after_step()
            sync()
            c4, w4 = time.process_time(), time.perf_counter()
            if i >= 2:
                cpu_step.append((c1 - c0) + (c3 - c2))
                cpu_diag.append((c2 - c1) + (c4 - c3))
                wall_step.append((w1 - w0) + (w3 - w2))
                wall_diag.append((w2 - w1) + (w4 - w3))
        diag.close()
    n_params = sum(w.numel() for _, w, _ in diag.layers)
    print(f"resnet18 {args.size}px batch {args.batch} on {args.device}, {len(diag.layers)} layers, "
          f"{n_params / 1e6:.1f}M raw weights, {args.steps} steps, torch threads "
          f"{torch.get_num_threads()}")
    for label, st, dg in (("cpu time", cpu_step, cpu_diag), ("wall time", wall_step, wall_diag)):
        s, c = statistics.median(st), statistics.median(dg)
        print(f"  {label:9s}: step {1000 * s:.0f} ms, collector {1000 * c:.0f} ms (medians); "
              f"step time ratio with/without: K=1 {1 + c / s:.3f}, K=10 {1 + c / (10 * s):.3f}, "
              f"K=50 {1 + c / (50 * s):.4f}")


if __name__ == "__main__":
    main()
