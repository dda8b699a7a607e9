"""Runs are reproducible from their seed and refuse bad settings before creating anything
(issue 13 items 4, 10, 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from wnconvert.cli.main import app

runner = CliRunner()
TINY = ["resnet18", "--weights", "none", "--num-classes", "10", "--image-size", "32", "--samples", "2"]
TRAIN = ["--data", "synthetic:10", "--limit-train", "16", "--limit-val", "8", "--batch-size", "8",
         "--workers", "0", "--log-every", "1", "--device", "cpu"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _metrics(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in rec.items() if k != "images_per_s"} for rec in records]


def test_one_seed_one_run(tmp_path: Path) -> None:
    """--weights none: the initialisation comes from --seed, so two runs are identical."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        r = invoke("finetune", *TINY, *TRAIN, "--epochs", "1", "--seed", "3", "--no-export", "--out", out)
        assert r.exit_code == 0, r.output
    a, b = (load_file(str(out / "checkpoint.safetensors")) for out in runs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(runs[0]) == _metrics(runs[1])
    assert len(_metrics(runs[0])) == 3
