"""SIGTERM to a real `wnconvert finetune`: it stops between two steps, saves that step's state,
exits 130, and the run resumes to completion (issue 13 item 3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from wnconvert.cli.main import app

ARGS = ["resnet18", "--weights", "none", "--num-classes", "10", "--image-size", "32", "--data", "synthetic:10",
        "--limit-train", "256", "--limit-val", "8", "--batch-size", "8", "--epochs", "1", "--workers", "0",
        "--log-every", "1", "--device", "cpu", "--no-export"]


def _step_records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "step" in r]


def _finetune_until_sigterm(args: list[str], out: Path, after_step: int) -> str:
    """A real `wnconvert finetune` process, sent SIGTERM once ``after_step`` steps are logged;
    asserts it exits 130 and returns its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "wnconvert.cli", "finetune", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while len(_step_records(out)) < after_step and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    return err


def test_sigterm_saves_the_last_completed_step_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    err = _finetune_until_sigterm(ARGS, out, after_step=1)
    assert err.count("\n") == 1 and "state saved to" in err, err
    saved = torch.load(out / "train" / "last.pt", weights_only=True)
    assert saved["partial"] is not None and 1 <= saved["step"] < 32
    tracked = {k: int(v) for k, v in saved["model"].items() if k.endswith("num_batches_tracked")}
    assert tracked and set(tracked.values()) == {saved["step"]}
    # what a SIGKILL leaves: records logged after the checkpoint, temporary files
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": saved["step"] + 1, "epoch": 1, "loss": 9.0, "lr": 0.1, "images_per_s": 1.0}) + "\n")
    leftovers = [out / "train" / ".last.pt.x1.tmp", out / ".model.onnx.x2.tmp", out / ".export-x3" / "model.onnx"]
    for p in leftovers:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"partial")
    r = CliRunner().invoke(app, ["finetune", "resnet18", "--resume", str(out)])
    assert r.exit_code == 0, r.output
    assert [r["step"] for r in _step_records(out)] == list(range(1, 33))  # no duplicate, none lost
    assert not any(p.exists() for p in leftovers) and not (out / ".export-x3").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def _image_folder(root: Path, n: int = 112) -> Path:
    """n small PNGs in two classes (16 for validation): data that is augmented (random crop and flip) when trained."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / ("train" if i < n - 16 else "val") / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _finetune(args: list[str]) -> None:
    """A real process, one thread: the same float arithmetic in every run being compared."""
    proc = subprocess.run([sys.executable, "-m", "wnconvert.cli", "finetune", *args], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_mid_epoch_resume_with_workers_is_exact(tmp_path: Path) -> None:
    """Two DataLoader workers augmenting: SIGTERM mid-epoch and --resume end with the same weights,
    bit for bit, as the uninterrupted run (augmentation seeded per batch, not per worker)."""
    data = _image_folder(tmp_path / "images")
    args = ["resnet18", "--weights", "none", "--num-classes", "2", "--image-size", "32",
            "--data", f"imagefolder:{data}", "--limit-val", "8", "--batch-size", "8", "--epochs", "1",
            "--workers", "2", "--log-every", "1", "--device", "cpu", "--no-export", "--seed", "3"]
    straight = tmp_path / "straight"
    _finetune([*args, "--out", str(straight)])
    resumed = tmp_path / "resumed"
    _finetune_until_sigterm(args, resumed, after_step=3)
    stopped_at = int(torch.load(resumed / "train" / "last.pt", weights_only=True)["step"])
    assert 3 <= stopped_at < 12
    _finetune(["resnet18", "--resume", str(resumed)])
    losses = [[s["loss"] for s in _step_records(run)] for run in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 12
    a = torch.load(straight / "train" / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed / "train" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
