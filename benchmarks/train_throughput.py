"""Training-step throughput: plain torchvision model vs the same model under a scheme.

Same process, same settings for every variant: bf16 autocast, channels_last, SGD with momentum,
synthetic data already on the device, batch 256 by default. Prints images/s per variant and the
ratios the fine-tuning engine is held to (layer-max vs plain, eager and compiled).

    python benchmarks/train_throughput.py --model resnet50 --batch 256 --steps 50
    python benchmarks/train_throughput.py --device cpu --model resnet18 --batch 8 --steps 3 --image-size 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import torchvision

from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.schemes import SchemeConfig


def step_fn(model, opt, x, y, device):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def measure(name, scheme, compiled, args, device) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=1000)
    if scheme != "none":
        apply_scheme(model, SchemeConfig(scheme, scale_grad=args.scale_grad))
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)
    fwd = torch.compile(model) if compiled else model
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    step = step_fn(fwd, opt, x, y, device)
    t0 = time.time()
    for _ in range(args.warmup):
        step()
    sync(device)
    warm = time.time() - t0
    times = []
    for _ in range(args.repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync(device)
        times.append(time.perf_counter() - t)
    best = sorted(times)[len(times) // 2]
    ips = args.batch * args.steps / best
    print(f"{name:28s} {ips:10.1f} img/s   (median of {args.repeats} x {args.steps} steps, "
          f"warm-up {warm:.1f}s, loss {float(loss):.3f})", flush=True)
    return {"variant": name, "images_per_s": ips, "warmup_s": warm}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scheme", default="layer-max")
    ap.add_argument("--scale-grad", default="full")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    res = {}
    res["plain eager"] = measure("plain eager", "none", False, args, device)
    res["scheme eager"] = measure(f"{args.scheme} eager", args.scheme, False, args, device)
    if not args.no_compile:
        res["plain compiled"] = measure("plain compiled", "none", True, args, device)
        res["scheme compiled"] = measure(f"{args.scheme} compiled", args.scheme, True, args, device)
    print()
    r_e = res["scheme eager"]["images_per_s"] / res["plain eager"]["images_per_s"]
    print(f"ratio {args.scheme}/plain, eager:    {r_e:.3f}  (target >= 0.97)")
    out = {"model": args.model, "batch": args.batch, "device": str(device), "eager_ratio": r_e,
           "results": res}
    if not args.no_compile:
        r_c = res["scheme compiled"]["images_per_s"] / res["plain compiled"]["images_per_s"]
        print(f"ratio {args.scheme}/plain, compiled: {r_c:.3f}  (target >= 0.99)")
        out["compiled_ratio"] = r_c
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
