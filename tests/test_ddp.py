"""Two-process DDP training on CPU (gloo) through torchrun: models/train/distributed.py + models/train/train.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.models.train import distributed
from wnconvert.models.train.train import evaluate

N_TRAIN, N_VAL = 40, 13  # 13: odd, so a padded sampler would be caught counting 14

WORKER = textwrap.dedent(f"""
    import json, sys
    from dataclasses import dataclass
    from pathlib import Path

    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from wnconvert.convert.apply import apply_scheme
    from wnconvert.convert.schemes import SchemeConfig
    from wnconvert.models.train.distributed import cleanup, init_distributed
    from wnconvert.models.train.train import TrainConfig, evaluate, train


    @dataclass
    class Bundle:
        train: object
        val: object
        num_classes: int = 4
        classes: tuple = ("a", "b", "c", "d")
        small_images: bool = True


    def data():
        g = torch.Generator().manual_seed(7)
        x = torch.randn({N_TRAIN} + {N_VAL}, 3, 8, 8, generator=g)
        y = (x.mean(dim=(2, 3)) @ torch.randn(3, 4, generator=g)).argmax(dim=1)
        return TensorDataset(x[:{N_TRAIN}], y[:{N_TRAIN}]), TensorDataset(x[{N_TRAIN}:], y[{N_TRAIN}:])


    def net():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        apply_scheme(m, SchemeConfig("layer-max", gain="learned"))
        return m


    out = Path(sys.argv[1])
    info = init_distributed()
    torch.set_num_threads(1)
    train_set, val_set = data()
    model = net()
    if info.rank == 1:  # different starting weights: train() must start from rank 0's everywhere
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
    config = TrainConfig(epochs=2, batch_size=4, optimizer="sgd", lr=0.05, workers=0, log_every=1, device="cpu",
                         wd_mode="eps-shifted")
    result = train(model, Bundle(train_set, val_set), config, out / "run")
    again = evaluate(model, val_set, batch_size=3)
    torch.save(model.state_dict(), out / f"rank{{info.rank}}.pt")
    (out / f"rank{{info.rank}}.json").write_text(json.dumps({{
        "rank": info.rank, "world": info.world_size, "evaluate": again,
        "history": [m.to_dict() for m in result.history], "initial": result.initial}}))
    cleanup()
""")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_ranks_end_with_identical_weights(ddp_run: Path) -> None:
    w0 = torch.load(ddp_run / "rank0.pt", weights_only=True)
    w1 = torch.load(ddp_run / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for k in w0:  # parameters and buffers (BN running stats) alike
        assert torch.equal(w0[k], w1[k]), k
    last = torch.load(ddp_run / "run" / "train" / "last.pt", weights_only=True)["model"]
    for k in w0:
        assert torch.equal(w0[k], last[k].cpu()), k


def test_only_rank0_writes_and_metrics_are_reduced(ddp_run: Path) -> None:
    lines = (ddp_run / "run" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    epochs = [r for r in recs if "step" not in r]
    steps = [r["step"] for r in recs if "step" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]        # written once, not once per rank
    assert steps == list(range(1, 2 * N_TRAIN // 8 + 1))  # 20 images per rank, batch 4 -> 5 steps/epoch
    assert sorted(p.name for p in (ddp_run / "run" / "train").iterdir()) == ["best.pt", "last.pt"]

    r0 = json.loads((ddp_run / "rank0.json").read_text())
    r1 = json.loads((ddp_run / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    def untimed(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in m.items() if k != "images_per_s"} for m in history]

    assert untimed(r0["history"]) == untimed(r1["history"]) and r0["initial"] == r1["initial"]
    assert r0["evaluate"] == r1["evaluate"]
    assert r0["evaluate"]["images"] == N_VAL  # every val image once over both ranks, none twice
    assert epochs[-1]["val_top1"] == pytest.approx(r0["evaluate"]["val_top1"])


def test_reduced_metrics_equal_single_process_evaluation(ddp_run: Path) -> None:
    """The all-reduced epoch metrics are those of the whole val set, not of rank 0's shard."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N_TRAIN + N_VAL, 3, 8, 8, generator=g)
    y = (x.mean(dim=(2, 3)) @ torch.randn(3, 4, generator=g)).argmax(dim=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    apply_scheme(model, SchemeConfig("layer-max", gain="learned"))
    model.load_state_dict(torch.load(ddp_run / "rank0.pt", weights_only=True))
    assert not distributed.is_initialized()
    single = evaluate(model, TensorDataset(x[N_TRAIN:], y[N_TRAIN:]), batch_size=5)
    last_epoch = json.loads((ddp_run / "rank0.json").read_text())["history"][-1]
    assert single["images"] == N_VAL
    assert last_epoch["val_top1"] == pytest.approx(single["val_top1"], abs=1e-9)
    assert last_epoch["val_top5"] == pytest.approx(single["val_top5"], abs=1e-9)
    assert last_epoch["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)


def test_single_process_info_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    assert distributed.shard(13, 1, 2) == list(range(1, 13, 2))
