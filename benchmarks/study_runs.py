"""Shared by the Fashion-MNIST studies (dynamics_study.py, lowbit_study.py): the runs are made by
wnconvert's own commands, each printed as a user would type it and recorded in RUN/command.txt.
A run whose directory is complete and whose command.txt matches is reused, so the two studies share
their baseline and fine-tunes and an interrupted study continues where it stopped.

Budget: the recipes below are sized for the 2-core CPU machine this project runs on (Fashion-MNIST
at its default 32 px, a few epochs); pass --baseline-epochs/--epochs/--device for a bigger machine. Every figure and
table says
which budget made it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

CLI = [sys.executable, "-m", "wnconvert.cli"]
# The studies start from --weights none or their own checkpoints: never from the network.
ENV = dict(os.environ, WNCONVERT_OFFLINE="1")


def shown(args: list[str]) -> str:
    return "wnconvert " + " ".join(shlex.quote(str(a)) for a in args)


def wnconvert(args: list[str], *, capture_json: bool = False) -> dict | None:
    """Run one wnconvert command (printed first); raise SystemExit with its stderr on failure."""
    args = [str(a) for a in args]
    print("$ " + shown(args), flush=True)
    proc = subprocess.run(CLI + args + (["--json"] if capture_json else []),
                          stdout=subprocess.PIPE if capture_json else None, text=True, env=ENV)
    if proc.returncode != 0:
        raise SystemExit(f"command failed with exit {proc.returncode}: {shown(args)}")
    return json.loads(proc.stdout) if capture_json else None


@dataclass
class Recipe:
    """The shared settings of a study: data, device, budgets."""
    runs: Path
    data: str = "fashion-mnist"
    device: str = "cpu"
    baseline_epochs: int = 8
    epochs: int = 2
    extra: list[str] = field(default_factory=list)  # e.g. ["--image-size", "64", "--workers", "12"]

    @property
    def baseline(self) -> Path:
        return self.runs / "baseline"

    def baseline_args(self) -> list[str]:
        """ResNet-18 from scratch, no reparametrization: the model every study starts from."""
        return ["finetune", "resnet18", "--data", self.data, "--weights", "none", "--scheme", "none",
                "--epochs", self.baseline_epochs, "--batch-size", 128, "--optimizer", "sgd",
                "--lr", 0.1, "--nesterov", "--weight-decay", "5e-4", "--label-smoothing", 0.1,
                "--warmup-epochs", 1, "--device", self.device, "--seed", 0, *self.extra,
                "--out", self.baseline]

    def finetune_args(self, name: str, scheme: str, *options) -> list[str]:
        """A fine-tune of the baseline under ``scheme``; ``options`` add or override settings."""
        return ["finetune", "resnet18", "--data", self.data,
                "--weights", self.baseline / "checkpoint.safetensors", "--scheme", scheme,
                "--epochs", self.epochs, "--device", self.device, "--seed", 0, *self.extra,
                *map(str, options), "--out", self.runs / name]


def made(args: list[str]) -> bool:
    """Whether ``--out DIR`` of ``args`` (a ``finetune``) already holds that run, complete."""
    args = [str(a) for a in args]
    out = Path(args[args.index("--out") + 1])
    done = out / "command.txt"
    manifest = out / "manifest.json"
    return (done.exists() and done.read_text().strip() == shown(args) and manifest.exists()
            and json.loads(manifest.read_text()).get("status") == "complete")


def ensure(args: list[str]) -> Path:
    """Run ``args`` (a ``finetune`` ending in ``--out DIR``) unless DIR already holds that run."""
    args = [str(a) for a in args]
    out = Path(args[args.index("--out") + 1])
    cmd = shown(args)
    if made(args):
        print(f"# reusing {out} ({cmd})", flush=True)
        return out
    wnconvert(args + ["--overwrite"])
    (out / "command.txt").write_text(cmd + "\n")
    return out


def read_jsonl(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def summary(run: Path) -> dict:
    """Final-epoch validation accuracy (PyTorch) and the exported model.onnx's own accuracy."""
    report = json.loads((run / "report.json").read_text())
    epochs = [r for r in read_jsonl(run / "metrics.jsonl") if "val_top1" in r]
    onnx = report.get("onnx_accuracy", {})
    return {"run": run.name, "command": (run / "command.txt").read_text().strip(),
            "val_top1": epochs[-1]["val_top1"] if epochs else None,
            "onnx_top1": onnx.get("top1"), "onnx_images": onnx.get("images"),
            "initial_top1": report.get("training", {}).get("initial", {}).get("val_top1")}


def parser(description: str) -> argparse.ArgumentParser:
    """The options both studies share (their runs must agree to be reused)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--runs", type=Path, default=Path("runs/study"), help="run directories (reused)")
    ap.add_argument("--docs", type=Path, default=Path("docs/figures"), help="figures, tables, JSON")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--baseline-epochs", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the fine-tunes at defaults")
    ap.add_argument("--eq-epochs", type=int, default=3, help="epochs of the equilibrium-regime runs")
    ap.add_argument("--every", type=int, default=10, help="--diagnostics K of the fine-tunes")
    ap.add_argument("--extra", default="", help="more finetune options for every run, e.g. '--workers 12'")
    return ap


def start(args: argparse.Namespace) -> Recipe:
    """The recipe of the parsed options, with its baseline made (or reused)."""
    recipe = Recipe(args.runs, args.data, args.device, args.baseline_epochs, args.epochs, args.extra.split())
    args.docs.mkdir(parents=True, exist_ok=True)
    ensure(recipe.baseline_args())
    return recipe
