"""Vela's estimates for ResNet-18 and MobileNetV2 .tflite files on the Ethos-U targets.

For each model and input size: a W8A8 run trained one step on 8 Fashion-MNIST images (Vela's figures
depend on the architecture and shapes, not on the weights' values), its int8 .tflite (``export
--target tflite-micro``, the run's trained scales), then ``export --target T`` for every Ethos-U
target; prints one row per (model, size, target) and writes the rows as JSON lines.

    python benchmarks/ethos_u_estimates.py --out runs/ethos [--models resnet18 mobilenet_v2] [--sizes 32 96]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TARGETS = ("ethos-u55-128", "ethos-u55-256", "ethos-u65-256", "ethos-u85-256")


def cli(*args) -> str:
    cmd = [sys.executable, "-m", "wnconvert.cli", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/ethos"))
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[32, 96])
    ap.add_argument("--targets", nargs="+", default=list(TARGETS))
    a = ap.parse_args()
    rows = []
    print("| model | px | target | ops | on NPU | CPU fallback | SRAM KiB | flash/DRAM KiB | MMACs | NPU cycles | "
          "total cycles | ms | inferences/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in a.models:
        for size in a.sizes:
            run = a.out / f"{model}-{size}"
            if not (run / "model.int8.tflite").is_file():
                # a W8A8 run of one step on 8 images: its trained scales make the int8 network
                cli("finetune", model, "--weights", "none", "--num-classes", 10, "--image-size", size,
                    "--data", "fashion-mnist", "--weight-bits", 8, "--act-bits", 8, "--epochs", 1, "--limit-train", 8,
                    "--limit-val", 8, "--batch-size", 8, "--workers", 0, "--device", "cpu", "--no-export",
                    "--overwrite", "--out", run)
                cli("export", run, "--target", "tflite-micro")
            for target in a.targets:
                f = json.loads(cli("export", run, "--target", target, "--json"))
                rows.append({"model": model, "size": size} | f)
                mem = f["flash_kib"] if f["flash_kib"] else f["dram_kib"]
                print(f"| {model} | {size} | {target} | {f['operators']} | {f['on_npu']} | "
                      f"{', '.join(f['cpu_fallback']) or '-'} | {f['sram_kib']:.1f} | {mem:.1f} | "
                      f"{f['macs'] / 1e6:.1f} | "
                      f"{f['cycles_npu']:,} | {f['cycles_total']:,} | {f['inference_s'] * 1e3:.3f} | "
                      f"{f['inferences_per_s']:,.0f} |", flush=True)
    (a.out / "ethos_u_estimates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
