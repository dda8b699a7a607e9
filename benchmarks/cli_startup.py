"""Wall time of the command line's start-up: ``--help``, ``export --help`` and one parser error.

    .venv/bin/python benchmarks/cli_startup.py [--repeats 5] [--wnconvert .venv/bin/wnconvert]

Each command runs in a fresh process (as a user types it); best of ``--repeats`` runs, seconds,
with the load average at the end, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (("--help",), ("export", "--help"), ("export", "RUN", "--precision", "bogus"))


def best_seconds(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--wnconvert", default=str(Path(sys.executable).with_name("wnconvert")))
    args = p.parse_args()
    for cmd in COMMANDS:
        print(f"wnconvert {' '.join(cmd):<36} {best_seconds([args.wnconvert, *cmd], args.repeats):.2f} s")
    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
