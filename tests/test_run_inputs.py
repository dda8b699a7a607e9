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


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory) -> list[Path]:
    """Two --no-export training runs with one seed."""
    runs = [tmp_path_factory.mktemp("seeded") / name for name in ("a", "b")]
    for out in runs:
        r = invoke("finetune", *TINY, *TRAIN, "--epochs", "1", "--seed", "3", "--no-export", "--out", out)
        assert r.exit_code == 0, r.output
    return runs


def test_one_seed_one_run(seeded_runs: list[Path]) -> None:
    """--weights none: the initialisation comes from --seed, so two runs are identical."""
    a, b = (load_file(str(out / "checkpoint.safetensors")) for out in seeded_runs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(seeded_runs[0]) == _metrics(seeded_runs[1])
    assert len(_metrics(seeded_runs[0])) == 3


def test_a_resumed_no_export_run_stays_unexported(seeded_runs: list[Path]) -> None:
    run = seeded_runs[1]
    assert json.loads((run / "manifest.json").read_text())["no_export"] is True
    r = invoke("finetune", "resnet18", "--resume", run)
    assert r.exit_code == 0, r.output
    assert not (run / "model.onnx").exists()
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"


def test_resume_refuses_options_it_would_ignore(seeded_runs: list[Path]) -> None:
    r = invoke("finetune", "resnet18", "--resume", seeded_runs[0], "--lr", "0.5", "--epochs", "3")
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1
    assert "--epochs, --lr would be ignored" in r.stderr
    r = invoke("finetune", "resnet50", "--resume", seeded_runs[0])
    assert r.exit_code == 2 and "is a resnet18 run, not resnet50" in r.stderr


BAD_FINETUNE = [
    (["--lr", "0"], "learning rate must be a positive number"),
    (["--lr", "nan"], "learning rate must be a positive number"),
    (["--momentum", "1.5"], "momentum must be in [0, 1)"),
    (["--nesterov", "--optimizer", "adamw"], "--nesterov needs sgd or lars"),
    (["--num-classes", "0"], "--num-classes must be between 1 and"),
    (["--num-classes", "-3"], "--num-classes must be between 1 and"),
    (["--image-size", "0"], "--image-size must be between 1 and 4096"),
    (["--image-size", "100000"], "--image-size must be between 1 and 4096"),
    (["--rtol", "-1"], "--rtol must be a positive number"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--epochs", "0", "--lr", "-1"], "learning rate must be a positive number"),  # convert only
    (["--epochs", "0", "--momentum", "2"], "momentum must be in [0, 1)"),
]
if not torch.cuda.is_available():
    BAD_FINETUNE.append((["--device", "cuda"], "no CUDA device is available"))


@pytest.mark.parametrize("args,message", BAD_FINETUNE, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_finetune_settings_create_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "run"
    base = [a for a in TINY if a not in ("--num-classes", "10", "--image-size", "32")]
    base += ["--num-classes", "10"] if "--num-classes" not in args else []
    base += ["--image-size", "32"] if "--image-size" not in args else []
    r = invoke("finetune", *base, *TRAIN, "--epochs", "1", *args, "--out", out)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--rtol", "-1"], "--rtol must be a positive number"),
    (["--rtol", "nan"], "--rtol must be a positive number"),
    (["--samples", "0"], "--samples must be at least 1"),
])
def test_bad_verify_settings(tmp_path: Path, args: list[str], message: str) -> None:
    r = invoke("verify", tmp_path, *args)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_a_stub_that_never_trained_is_replaced_by_a_rerun(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["finetune", *TINY, "--epochs", "0", "--no-export", "--out", out]
    assert invoke(*args).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest | {"status": "running"}))  # a killed run
    (out / "stale.txt").write_text("left by the stub")
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    # a stub that trained (train/last.pt) is a run to resume, not to replace
    (out / "manifest.json").write_text(json.dumps(manifest | {"status": "running"}))
    (out / "train").mkdir()
    (out / "train" / "last.pt").write_bytes(b"")
    r = invoke(*args)
    assert r.exit_code == 2 and "already holds a run" in r.stderr
