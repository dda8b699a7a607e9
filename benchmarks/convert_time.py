"""Conversion time of this tree against an earlier commit: `finetune MODEL --epochs 0` (build,
scheme, fold, export, range check, parity) run by both, alternately, so that a machine whose load
drifts slows both alike.

    python benchmarks/convert_time.py --ref a2c5c9a --model resnet50 --image-size 224 --rounds 3

The earlier commit's `convert/`, `cli/` and `models/` are extracted with `git archive` into a
temporary folder and imported ahead of the installed package (PYTHONPATH); each command checks
which tree it imported. Prints best and median wall-clock and CPU seconds of each tree and their
ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("convert", "cli", "models")
RUNNER = ("import sys, wnconvert.convert as c; from wnconvert.cli.main import main; "
          "assert c.__file__.startswith(sys.argv[1]), c.__file__; sys.argv = ['wnconvert'] + sys.argv[2:]; main()")


def overlay(src: Path, dest: Path) -> Path:
    """dest/wnconvert/{convert,cli,models} -> src/...: an importable wnconvert made of ``src``."""
    pkg = dest / "wnconvert"
    pkg.mkdir(parents=True)
    for name in PACKAGES:
        (pkg / name).symlink_to(src / name, target_is_directory=True)
    return dest


def extract(ref: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, *PACKAGES], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def timed(pythonpath: Path, args: list[str], out: Path) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of the child: user + system). On a busy machine the CPU
    time is the steadier of the two."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath), WNCONVERT_OFFLINE="1")
    cmd = [sys.executable, "-c", RUNNER, str(pythonpath), *args, "--out", str(out), "--overwrite"]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-2000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", required=True, help="the earlier commit to compare with")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the raw times here")
    a = ap.parse_args()
    args = ["finetune", a.model, "--weights", "none", "--epochs", "0", "--image-size", str(a.image_size),
            "--device", "cpu", "--scheme", "layer-max"]
    print("$ wnconvert " + " ".join(args) + " --out DIR --overwrite", flush=True)
    with tempfile.TemporaryDirectory(prefix="wnc-time-") as tmp:
        tmp = Path(tmp)
        trees = {a.ref: overlay(extract(a.ref, tmp / "ref-src"), tmp / "ref"),
                 "this tree": overlay(ROOT, tmp / "new")}
        wall: dict[str, list[float]] = {name: [] for name in trees}
        cpu: dict[str, list[float]] = {name: [] for name in trees}
        for r in range(a.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                w, c = timed(trees[name], args, tmp / "out")
                wall[name].append(w)
                cpu[name].append(c)
                print(f"round {r + 1}: {name}: {w:.1f} s wall, {c:.1f} s CPU", flush=True)
    rows = {name: {"wall_best": min(wall[name]), "wall_median": statistics.median(wall[name]),
                   "cpu_best": min(cpu[name]), "cpu_median": statistics.median(cpu[name]),
                   "wall": wall[name], "cpu": cpu[name]} for name in trees}
    for name, row in rows.items():
        print(f"{name:>12}: wall best {row['wall_best']:.1f} s (median {row['wall_median']:.1f}), "
              f"CPU best {row['cpu_best']:.1f} s (median {row['cpu_median']:.1f})")
    ratios = {k: rows["this tree"][k] / rows[a.ref][k] for k in ("wall_best", "cpu_best")}
    print(f"this tree / {a.ref}: wall {ratios['wall_best']:.3f}, CPU {ratios['cpu_best']:.3f} (best of {a.rounds})")
    if a.json:
        a.json.write_text(json.dumps({"command": args, "ref": a.ref, "rows": rows, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
