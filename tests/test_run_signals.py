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

import torch
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


def test_sigterm_saves_the_last_completed_step_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "wnconvert.cli", "finetune", *ARGS, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not _step_records(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
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
