"""The training loop (models/train/train.py) and its checkpoints (models/train/checkpoint.py), on CPU."""

from __future__ import annotations

import json
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import Dataset, TensorDataset

from wnconvert.convert.apply import apply_scheme, reparametrized
from wnconvert.convert.errors import Interrupted, TrainingError, UserInputError
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.models.train import checkpoint as ckpt
from wnconvert.models.train.train import TrainConfig, evaluate, train

STEP_KEYS = {"step", "epoch", "loss", "lr", "images_per_s"}
EPOCH_KEYS = {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s"}


@dataclass
class Bundle:  # stand-in for models.data.data.DataBundle
    train: Dataset
    val: Dataset
    num_classes: int = 4
    classes: list[str] = field(default_factory=lambda: ["a", "b", "c", "d"])
    small_images: bool = True


from helpers import one_thread  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def tiny_data(n_train: int = 48, n_val: int = 20, size: int = 8) -> Bundle:
    """A learnable 4-class task: the label is the arg-max of a fixed mix of channel means."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n_train + n_val, 3, size, size, generator=g)
    mix = torch.tensor([[2.0, -1.0, 0.0, -1.0], [0.0, 2.0, -1.0, -1.0], [-1.0, 0.0, 2.0, -1.0]])
    y = (x.mean(dim=(2, 3)) @ mix).argmax(dim=1)
    return Bundle(TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:]))


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=8, optimizer="sgd", lr=0.05, workers=0, log_every=2, device="cpu")
    return TrainConfig(**{**base, **kw})


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Tripwire(Dataset):
    """Wraps a dataset; after ``after`` item reads, raises KeyboardInterrupt once or yields NaN."""

    def __init__(self, base: Dataset, after: int, action: str) -> None:
        self.base, self.after, self.action, self.reads, self.fired = base, after, action, 0, False

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        self.reads += 1
        if self.reads > self.after:
            if self.action == "nan":
                return torch.full_like(x, float("nan")), y
            if not self.fired:
                self.fired = True
                if self.action == "signal":  # Ctrl-C as the terminal sends it: the batch completes
                    os.kill(os.getpid(), signal.SIGINT)
                else:
                    raise KeyboardInterrupt
        return x, y


class RandomAugment(Dataset):
    """Random flip and noise drawn from torch, numpy and python RNGs (as real transforms do)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x * (1 + 0.1 * float(np.random.rand())) + 0.05 * random.random(), y


# -- basic run ---------------------------------------------------------------------------------

def test_training_lowers_loss_and_writes_metrics(tmp_path: Path) -> None:
    data = tiny_data()
    model = tiny_net()
    result = train(model, data, cfg(epochs=4, lr=0.1), tmp_path)
    assert [m.epoch for m in result.history] == [1, 2, 3, 4]
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.history[-1].val_loss < result.initial["val_loss"]
    assert set(result.initial) == {"val_loss", "val_top1", "val_top5"}
    assert result.best_top1 == max(m.val_top1 for m in result.history)
    assert result.history[result.best_epoch - 1].val_top1 == result.best_top1

    recs = records(tmp_path)
    steps = [r for r in recs if "step" in r]
    epochs = [r for r in recs if "step" not in r]
    assert steps and all(set(r) == STEP_KEYS for r in steps)
    assert [r["step"] for r in steps] == list(range(2, 6 * 4 + 1, 2))  # 48/8 = 6 steps per epoch
    assert all(set(r) == EPOCH_KEYS for r in epochs) and [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert all(0 <= r["val_top1"] <= r["val_top5"] <= 1 for r in epochs)
    assert epochs[-1]["val_top1"] == result.history[-1].val_top1
    assert steps[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 24)).item()))

    # the caller's object holds the last weights, a plain module on the CPU
    assert type(model) is nn.Sequential and next(model.parameters()).device.type == "cpu"
    assert evaluate(model, data.val, batch_size=7)["val_top1"] == result.history[-1].val_top1


def test_checkpoints_load_weights_only(tmp_path: Path) -> None:
    data = tiny_data()
    model = tiny_net()
    train(model, data, cfg(epochs=1), tmp_path)
    for name in (ckpt.LAST, ckpt.BEST):
        state = torch.load(tmp_path / "train" / name, weights_only=True)
        assert {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "best", "config",
                "rng"} <= set(state)
        assert state["epoch"] == 1 and state["step"] == 6 and state["config"]["lr"] == 0.05
        assert {"torch", "python", "numpy", "cuda"} <= set(state["rng"][0])
    last = torch.load(tmp_path / "train" / ckpt.LAST, weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(last["model"][k], v, rtol=0, atol=0)
    assert not list((tmp_path / "train").glob("*.tmp"))
    # the best epoch is the last one: best.pt is the same file, not a second copy on disk
    assert os.stat(tmp_path / "train" / ckpt.BEST).st_ino == os.stat(tmp_path / "train" / ckpt.LAST).st_ino


def test_best_link_survives_the_next_save(tmp_path: Path) -> None:
    last, best = tmp_path / ckpt.LAST, tmp_path / ckpt.BEST
    ckpt.save_atomic({"epoch": 1}, last)
    ckpt.link_atomic(last, best)
    assert os.stat(last).st_nlink == 2
    ckpt.save_atomic({"epoch": 2}, last)  # a later, worse epoch
    assert torch.load(best, weights_only=True) == {"epoch": 1}
    assert torch.load(last, weights_only=True) == {"epoch": 2}
    ckpt.link_atomic(last, best)  # replacing an existing best.pt
    assert torch.load(best, weights_only=True) == {"epoch": 2} and not list(tmp_path.glob("*.tmp"))


def test_evaluate_counts_every_image() -> None:
    data = tiny_data(n_val=21)
    out = evaluate(tiny_net(), data.val, batch_size=4)
    assert out["images"] == 21 and out["val_top5"] == 1.0  # 4 classes: top-5 always hits
    assert 0 <= out["val_top1"] <= 1 and out["val_loss"] > 0


# -- resume ------------------------------------------------------------------------------------

def assert_same_run(a: nn.Module, ra, b: nn.Module, rb) -> None:
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6)
    assert len(ra.history) == len(rb.history)
    for ma, mb in zip(ra.history, rb.history):
        for key in ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr"):
            assert getattr(ma, key) == pytest.approx(getattr(mb, key), abs=1e-6), key
    assert ra.initial == pytest.approx(rb.initial)
    assert (ra.best_top1, ra.best_epoch) == (rb.best_top1, rb.best_epoch)


@pytest.mark.parametrize("optimizer, wd_mode, stop_after_batches, randomness, how", [
    ("sgd", "l2", 0, True, "interrupt"),             # Ctrl-C right at the epoch boundary
    ("lars", "eps-shifted", 2, False, "interrupt"),  # KeyboardInterrupt inside a batch fetch
    ("adamw", "eps-shifted", 0, True, "interrupt"),
    ("sgd", "l2", 2, True, "signal"),  # SIGINT mid-epoch: the step completes, RNG state of that step
])
def test_resume_matches_uninterrupted(tmp_path: Path, optimizer: str, wd_mode: str,
                                      stop_after_batches: int, randomness: bool, how: str) -> None:
    data = tiny_data()
    if randomness:  # dropout and augmentation: resume must restore every RNG
        data = Bundle(RandomAugment(data.train), data.val)
    config = cfg(optimizer=optimizer, wd_mode=wd_mode, lr=None, warmup_epochs=0.5, nesterov=False,
                 label_smoothing=0.1, grad_clip=5.0)

    def model() -> nn.Module:
        m = tiny_net()
        apply_scheme(m, SchemeConfig("layer-max", gain="learned"))
        if randomness:
            m.insert(7, nn.Dropout(0.3))
        return m

    straight = model()
    r_straight = train(straight, data, config, tmp_path / "a")

    resumed = model()
    n = len(data.train)
    tripped = Bundle(Tripwire(data.train, n + stop_after_batches * 8, how), data.val)
    with pytest.raises(Interrupted, match=r"--resume .*b"):
        train(resumed, tripped, config, tmp_path / "b")
    saved = torch.load(tmp_path / "b" / "train" / ckpt.LAST, weights_only=True)
    done = 6 + stop_after_batches + (how == "signal")
    assert saved["epoch"] == 1 and saved["step"] == done
    tracked = [v for k, v in saved["model"].items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == done for v in tracked)
    r_resumed = train(resumed, data, config, tmp_path / "b", resume=True)
    assert_same_run(straight, r_straight, resumed, r_resumed)
    if how == "signal":  # stopped between steps, --workers 0: bit-identical, RNG use included
        a, b = straight.state_dict(), resumed.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [r["epoch"] for r in records(tmp_path / "b") if "step" not in r]
    assert epochs == [1, 2]


def test_resume_from_epoch_checkpoint_after_crash(tmp_path: Path) -> None:
    """1 epoch, a crash in epoch 2 (last.pt is the epoch-1 checkpoint), resume: same as 2 epochs."""
    data = tiny_data()
    data = Bundle(RandomAugment(data.train), data.val)
    config = cfg(optimizer="sgd", nesterov=True, warmup_epochs=1)

    def model() -> nn.Module:
        m = tiny_net()
        m.insert(7, nn.Dropout(0.3))
        return m

    straight = model()
    r_straight = train(straight, data, config, tmp_path / "a")
    resumed = model()
    poisoned = Bundle(Tripwire(data.train, len(data.train) + 16, "nan"), data.val)
    with pytest.raises(TrainingError):
        train(resumed, poisoned, config, tmp_path / "b")
    r_resumed = train(resumed, data, config, tmp_path / "b", resume=True)
    assert_same_run(straight, r_straight, resumed, r_resumed)

def test_resume_rewrites_the_log_as_its_checkpoint_saw_it(tmp_path: Path) -> None:
    """An epoch record lost by a crash comes back, records written after the checkpoint go."""
    data = tiny_data()
    train(tiny_net(), data, cfg(epochs=1), tmp_path)
    log = tmp_path / "metrics.jsonl"
    good = records(tmp_path)
    assert [r.get("step") for r in good][-1] is None  # the epoch record ends it
    log.write_text("".join(json.dumps(r) + "\n" for r in good[:-1])  # the epoch record lost
                   + json.dumps({"step": 99, "epoch": 2, "loss": 1.0}) + "\n{cut")  # and junk after
    train(tiny_net(), data, cfg(epochs=1), tmp_path, resume=True)
    assert records(tmp_path) == good


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    data = tiny_data()
    train(tiny_net(), data, cfg(epochs=1), tmp_path)
    with pytest.raises(UserInputError, match="lr"):
        train(tiny_net(), data, cfg(epochs=1, lr=0.2), tmp_path, resume=True)
    with pytest.raises(UserInputError, match="no training checkpoint"):
        train(tiny_net(), data, cfg(), tmp_path / "elsewhere", resume=True)


def test_resume_of_finished_run_returns_its_history(tmp_path: Path) -> None:
    data = tiny_data()
    first = train(tiny_net(), data, cfg(epochs=1), tmp_path)
    model = tiny_net(seed=5)
    again = train(model, data, cfg(epochs=1), tmp_path, resume=True)
    assert again.history == first.history
    last = torch.load(tmp_path / "train" / ckpt.LAST, weights_only=True)
    torch.testing.assert_close(model.state_dict(), dict(last["model"]))


# -- failures ----------------------------------------------------------------------------------

def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    data = tiny_data()
    poisoned = Bundle(Tripwire(data.train, len(data.train) + 8, "nan"), data.val)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2 step 8; the last good "
                                            r"checkpoint is kept at .*last\.pt") as err:
        train(tiny_net(), poisoned, cfg(epochs=3), tmp_path)
    assert "\n" not in str(err.value)
    last = torch.load(tmp_path / "train" / ckpt.LAST, weights_only=True)
    assert last["epoch"] == 1 and last["step"] == 6 and ckpt.all_finite(last["model"])
    assert [r["epoch"] for r in records(tmp_path) if "step" not in r] == [1]


def test_nan_in_first_epoch_says_nothing_was_saved(tmp_path: Path) -> None:
    data = tiny_data()
    poisoned = Bundle(Tripwire(data.train, 0, "nan"), data.val)
    with pytest.raises(TrainingError, match="step 1; no checkpoint was written yet"):
        train(tiny_net(), poisoned, cfg(), tmp_path)
    assert not (tmp_path / "train" / ckpt.LAST).exists()


def test_bad_config_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="optimizer"):
        train(tiny_net(), tiny_data(), cfg(optimizer="sgdx"), tmp_path)
    with pytest.raises(UserInputError, match="wd mode"):
        train(tiny_net(), tiny_data(), cfg(wd_mode="l1"), tmp_path)


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"a": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# -- reparametrized models ---------------------------------------------------------------------

@pytest.mark.parametrize("gain", ["frozen", "learned"])
def test_layer_max_model_trains_and_stays_in_range(tmp_path: Path, gain: str) -> None:
    data = tiny_data()
    model = tiny_net()
    apply_scheme(model, SchemeConfig("layer-max", gain=gain))
    raw_before = {t.qualname: m.parametrizations.weight.original.detach().clone()
                  for t, m, _ in reparametrized(model)}
    result = train(model, data, cfg(epochs=3, lr=0.1, wd_mode="eps-shifted"), tmp_path)
    assert result.history[-1].val_loss < result.initial["val_loss"]
    triples = reparametrized(model)
    assert len(triples) == 3
    for target, module, p in triples:
        assert parametrize.is_parametrized(module, "weight")
        assert not torch.equal(module.parametrizations.weight.original.detach(), raw_before[target.qualname])
        effective = module.weight.detach()
        assert effective.abs().max() <= p.gain.detach().abs() * (1 + 1e-6)
        normalized = effective / p.gain.detach()
        assert normalized.abs().max() == pytest.approx(1.0)


def test_torchvision_resnet18_small_images(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    apply_scheme(model, SchemeConfig("layer-max"))
    data = tiny_data(n_train=16, n_val=8, size=16)
    result = train(model, data, cfg(epochs=1, batch_size=8, lr=0.01), tmp_path)
    assert len(result.history) == 1 and result.history[0].val_top5 == 1.0
    state = torch.load(tmp_path / "train" / ckpt.LAST, weights_only=True)["model"]
    assert "conv1.parametrizations.weight.original" in state


@pytest.mark.slow
def test_compiled_forward_matches_eager(tmp_path: Path) -> None:
    """compile=True trains the same parametrized model (CPU inductor: 10-30 s, so marked slow)."""
    data = tiny_data(n_train=16, n_val=8)
    models = []
    for compiled in (False, True):
        m = tiny_net()
        apply_scheme(m, SchemeConfig("layer-max", gain="learned"))
        train(m, data, cfg(epochs=1, compile=compiled), tmp_path / str(compiled))
        assert type(m) is nn.Sequential and parametrize.is_parametrized(m[0], "weight")
        models.append(m)
    for (k, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("terminal", [False, True])
def test_console_output(tmp_path: Path, terminal: bool) -> None:
    io = pytest.importorskip("io")
    rich_console = pytest.importorskip("rich.console")
    buf = io.StringIO()
    console = rich_console.Console(file=buf, force_terminal=terminal, width=120)
    train(tiny_net(), tiny_data(), cfg(epochs=2), tmp_path, console=console)
    text = buf.getvalue()
    assert "epoch 1/2: train loss" in text and "epoch 2/2: train loss" in text
    assert ("━" in text) is terminal  # the progress bar only on a terminal
