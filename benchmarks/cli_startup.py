"""Start-up time of the command line, this tree against an earlier commit: ``--help``,
``export --help`` and one parser error, each in a fresh process as a user types it, the two trees
alternately so that a machine whose load drifts slows both alike.

    python benchmarks/cli_startup.py --ref f1e8496 --rounds 5

The earlier tree is imported ahead of the installed package as in ``convert_time.py`` (whose
helpers this uses). Prints the best wall-clock and CPU seconds (user + system) of each command and
tree, the heavy modules each command loaded, and the load average.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from convert_time import ROOT, RUNNER, extract, overlay

COMMANDS = (("--help",), ("export", "--help"), ("export", "RUN", "--precision", "bogus"))
HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "openvino", "numpy")
# RUNNER, then the heavy modules loaded, on stderr as the process exits (after any SystemExit)
PROBE = ("import atexit, sys\natexit.register(lambda: print('loaded:', *[m for m in %r if m in sys.modules], "
         "file=sys.stderr))\n" % (HEAVY,)) + RUNNER


def timed(pythonpath: Path, args: tuple[str, ...]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, the heavy modules it loaded)."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath), COLUMNS="100")
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, str(pythonpath), *args], env=env,
                          capture_output=True, text=True)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 2) or "loaded:" not in proc.stderr:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-2000:]}")
    loaded = proc.stderr.rsplit("loaded:", 1)[1].split()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, ", ".join(loaded) or "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", required=True, help="the earlier commit to compare with")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="wnc-startup-") as tmp:
        tmp = Path(tmp)
        trees = {a.ref: overlay(extract(a.ref, tmp / "ref-src"), tmp / "ref"),
                 "this tree": overlay(ROOT, tmp / "new")}
        runs: dict[tuple[str, tuple[str, ...]], list] = {(t, c): [] for c in COMMANDS for t in trees}
        for _ in range(a.rounds):
            for (tree, cmd), rs in runs.items():
                rs.append(timed(trees[tree], cmd))
    print("| command | tree | wall, best | CPU s, best | heavy modules loaded |\n|---|---|---|---|---|")
    for (tree, cmd), rs in runs.items():
        print(f"| `wnconvert {' '.join(cmd)}` | {tree} | {min(r[0] for r in rs):.2f} s | "
              f"{min(r[1] for r in rs):.2f} | {rs[0][2]} |")
    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
