"""Runs through the real entry points: pretrained weights from the hub cache, torchrun."""

import json
import os
import socket
import subprocess
import sys

import torch
import torchvision
from typer.testing import CliRunner

from wnconvert.cli.main import app


def test_pretrained_weights_from_the_hub_cache(tmp_path, monkeypatch):
    """`--weights DEFAULT` resolves through torchvision's weights API and reads the cached file."""
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    cached = torchvision.models.resnet18().state_dict()
    torch.save(cached, hub / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["finetune", "resnet18", "--weights", "IMAGENET1K_V1", "--num-classes", "10",
                                 "--epochs", "0", "--image-size", "64", "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert manifest["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    from safetensors.torch import load_file
    state = load_file(str(out / "checkpoint.safetensors"))
    # the body came from the cached file (layer1's conv is reparametrized: compare its raw weight)
    assert torch.equal(state["layer1.0.conv1.parametrizations.weight.original"], cached["layer1.0.conv1.weight"])
    assert state["fc.parametrizations.weight.original"].shape == (10, 512)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(tmp_path):
    """`torchrun -m wnconvert.cli finetune …` with 2 gloo processes: rank 0 alone writes."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "wnconvert.cli", "finetune", "resnet18", "--data", "synthetic:4", "--weights", "none",
           "--epochs", "1", "--limit-train", "32", "--limit-val", "18", "--image-size", "32",
           "--batch-size", "8", "--workers", "0", "--device", "cpu", "--samples", "2", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for f in ("model.onnx", "manifest.json", "report.json", "checkpoint.safetensors", "metrics.jsonl"):
        assert (out / f).is_file(), f
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if "val_top1" in e]
    assert len(epochs) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["passed"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
