"""What the library front door and the end of a run cost.

    python benchmarks/api_costs.py --rounds 5

1. ``import wnconvert`` (and ``wnconvert.QATConfig()``) in fresh processes: seconds inside the
   process (best and median) and the heavy modules it loaded (none may be).
2. A tiny ``--act-bits`` finetune (resnet18, 32 px, 16 synthetic images, --epochs 0), with and
   without ``--no-deploy``, alternately: CPU seconds (user + system) of each, so that the load of
   a shared machine weighs less than in wall-clock time; the ratio is the cost of writing and
   checking the deployed file at the end of a run.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

IMPORT = ("import sys, time\nt = time.perf_counter()\nimport wnconvert\nwnconvert.QATConfig()\n"
          "print(time.perf_counter() - t, *[m for m in ('torch', 'torchvision', 'onnx', 'onnxruntime', 'numpy')"
          " if m in sys.modules])")
RUN = ["finetune", "resnet18", "--weights", "none", "--image-size", "32", "--num-classes", "10", "--data",
       "synthetic:10", "--workers", "0", "--device", "cpu", "--batch-size", "16", "--samples", "2",
       "--limit-train", "16", "--limit-val", "16", "--epochs", "0", "--weight-bits", "8", "--act-bits", "8"]


def child_cpu(cmd: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "WNCONVERT_OFFLINE": "1"})
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--run-rounds", type=int, default=2)
    a = ap.parse_args()
    secs, loaded = [], set()
    for _ in range(a.rounds):
        out = subprocess.run([sys.executable, "-c", IMPORT], check=True, capture_output=True, text=True, cwd="/")
        s, *mods = out.stdout.split()
        secs.append(float(s))
        loaded |= set(mods)
    print(f"import wnconvert: best {min(secs):.3f} s, median {statistics.median(secs):.3f} s "
          f"({a.rounds} fresh processes); heavy modules loaded: {sorted(loaded) or 'none'}")
    exe = [sys.executable, "-m", "wnconvert.cli"]
    cost = {"deploy": [], "no-deploy": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.run_rounds):
            for kind in ("deploy", "no-deploy"):
                extra = ["--no-deploy"] if kind == "no-deploy" else []
                cost[kind].append(child_cpu(exe + RUN + extra + ["--out", f"{tmp}/{kind}{i}"]))
    for kind, v in cost.items():
        print(f"finetune --act-bits 8 (epochs 0) {kind}: best CPU {min(c for c, _ in v):.1f} s, "
              f"best wall {min(w for _, w in v):.1f} s")
    d, n = min(c for c, _ in cost["deploy"]), min(c for c, _ in cost["no-deploy"])
    print(f"deployed file at the end of the run: +{d - n:.1f} CPU s ({d / n:.2f}x); load average "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
