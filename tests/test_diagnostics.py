"""--diagnostics (models/train/diagnostics.py) in the training loop, and `wnconvert report`."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from test_train import tiny_data, tiny_net
from typer.testing import CliRunner

from wnconvert.convert.apply import apply_scheme
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.models.train.diagnostics import DYNAMICS, INITIAL, read_dynamics
from wnconvert.models.train.train import TrainConfig, train

FIELDS = {"w_norm", "w_max", "g_norm", "w_over_g", "eff_lr", "angle", "grad_at_max",
          "grad_max_ratio", "frac_at_unit"}


from helpers import one_thread  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(tmp_path, scheme="layer-max", **kw):
    model = tiny_net()
    apply_scheme(model, SchemeConfig(scheme))
    cfg = dict(epochs=1, batch_size=8, optimizer="sgd", lr=0.05, weight_decay=5e-4, device="cpu", workers=0,
               log_every=0, diagnostics=1)
    cfg.update(kw)
    train(model, tiny_data(), TrainConfig(**cfg), tmp_path)
    return read_dynamics(tmp_path / DYNAMICS)


def _all_finite(records):
    for rec in records:
        for name, vals in rec["layers"].items():
            for k, v in vals.items():
                assert v is not None and math.isfinite(v), (rec["step"], name, k, v)


def test_sgd_dynamics_records(tmp_path):
    recs = _train(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 7))  # 48 images / batch 8, every step
    _all_finite(recs)
    layers = recs[0]["layers"]
    assert set(layers) == {"0.weight", "3.weight", "8.weight"}
    for vals in layers.values():
        assert FIELDS <= set(vals)
        assert "grid_changed" not in vals  # no weight_bits
        assert vals["equilibrium"] == pytest.approx(math.sqrt(0.05 / (2 * 5e-4 * (1 - 0.9))))
        assert vals["w_over_g"] == pytest.approx(vals["w_norm"] / vals["g_norm"], rel=1e-5)
        assert vals["eff_lr"] == pytest.approx(recs[0]["lr"] / vals["w_norm"] ** 2, rel=1e-5)
        assert vals["angle"] > 0
        assert 0 < vals["frac_at_unit"] <= 1
    assert (tmp_path / INITIAL).exists()
    init = json.loads((tmp_path / INITIAL).read_text())
    assert set(init["layers"]) == set(layers)


def test_every_k_and_other_optimizers(tmp_path):
    recs = _train(tmp_path / "a", diagnostics=4, epochs=2)
    assert [r["step"] for r in recs] == [4, 8, 12]
    recs = _train(tmp_path / "b", optimizer="adamw", lr=1e-3, weight_decay=0.05)
    _all_finite(recs)
    assert all("equilibrium" not in v for r in recs for v in r["layers"].values())
    recs = _train(tmp_path / "c", scheme="channel-max", optimizer="lars", lr=0.05)
    _all_finite(recs)
    assert not (tmp_path / "d").exists()
    _train(tmp_path / "d", diagnostics=0)
    assert not (tmp_path / "d" / DYNAMICS).exists()


def test_grid_changed_with_weight_bits(tmp_path):
    model = tiny_net()
    report = apply_scheme(model, SchemeConfig("layer-max"))
    from wnconvert.convert.apply import reparametrized
    for _, _, p in reparametrized(model):
        p.weight_bits = 4  # what a QAT parametrization carries
    train(model, tiny_data(), TrainConfig(epochs=1, batch_size=8, optimizer="sgd", lr=0.05, device="cpu", workers=0,
                                          log_every=0, diagnostics=2), tmp_path)
    recs = read_dynamics(tmp_path / DYNAMICS)
    assert report.applied and recs
    _all_finite(recs)
    for r in recs:
        for vals in r["layers"].values():
            assert 0 <= vals["grid_changed"] <= 1


def test_negative_diagnostics_rejected():
    from wnconvert.convert.errors import UserInputError
    with pytest.raises(UserInputError):
        TrainConfig(diagnostics=-1).validate()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from wnconvert.cli.main import app
    out = tmp_path_factory.mktemp("run") / "r"
    res = CliRunner().invoke(app, [
        "finetune", "resnet18", "--data", "synthetic:4", "--weights", "none", "--epochs", "1",
        "--limit-train", "32", "--limit-val", "16", "--image-size", "32", "--device", "cpu",
        "--diagnostics", "1", "--optimizer", "sgd", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_cli_finetune_writes_dynamics(cli_run):
    recs = read_dynamics(cli_run / DYNAMICS)
    assert len(recs) == 1  # 32 images, batch 128: one step
    _all_finite(recs)
    assert all("equilibrium" in v for v in recs[-1]["layers"].values())


def test_report_html_self_contained(cli_run):
    from wnconvert.cli.main import app
    res = CliRunner().invoke(app, ["report", str(cli_run)])
    assert res.exit_code == 0, res.output
    out = cli_run / "report"
    page = (out / "report.html").read_text(encoding="utf-8")
    imgs = re.findall(r"<img\b[^>]*>", page)
    assert len(imgs) >= 6
    for tag in imgs:
        assert re.search(r"src='data:image/png;base64,[A-Za-z0-9+/=]+'", tag), tag[:80]
    # nothing fetched from elsewhere: no src/href pointing at a file or URL
    assert not re.search(r"(src|href)=['\"](?!data:)", page)
    for name in ("loss.png", "accuracy.png", "weight_norm.png", "eff_lr.png", "w_over_g.png",
                 "histograms.png", "sqnr.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = json.loads((out / "summary.json").read_text())
    rows = [r for r in summary["layers"] if "sqnr8" in r]
    assert rows and all(r["sqnr8"] > r["sqnr4"] for r in rows)


def test_report_on_a_non_run_is_one_line_error(tmp_path):
    from wnconvert.cli.main import app
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2
    assert "Traceback" not in res.output


def test_collector_fields_match_direct_computation(tmp_path):
    from wnconvert.models.train.diagnostics import Diagnostics
    from wnconvert.models.train.optim import build_optimizer
    model = tiny_net()
    apply_scheme(model, SchemeConfig("layer-max"))
    opt = build_optimizer(model, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)
    diag = Diagnostics(model, opt, 1, tmp_path, optimizer_name="sgd", momentum=0.9)
    x, y = tiny_data().train.tensors
    torch.nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
    raw = model[3].parametrizations.weight.original
    w0, g = raw.detach().double().clone(), raw.grad.detach().double().clone()
    diag.before_step(1, 1, 0.1)
    opt.step()
    diag.after_step()
    diag.close()
    rec = read_dynamics(tmp_path / DYNAMICS)[0]["layers"]["3.weight"]
    w1 = raw.detach().double()
    cos = torch.dot(w0.flatten(), w1.flatten()) / (w0.norm() * w1.norm())
    assert rec["angle"] == pytest.approx(float(torch.arccos(cos)), rel=1e-3)
    a = int(w0.abs().argmax())
    assert rec["w_max"] == pytest.approx(float(w0.abs().max()), rel=1e-6)
    assert rec["grad_max_ratio"] == pytest.approx(float(g.flatten()[a].abs() / g.abs().mean()), rel=1e-5)
    assert rec["frac_at_unit"] == pytest.approx(1 / w0.numel())
    # full-scale layer-max: the gradient is orthogonal to W, and the max element carries the
    # radial correction (docs/gradients.md)
    assert abs(float(torch.dot(g.flatten(), w0.flatten()))) < 1e-4 * float(g.norm() * w0.norm())
