"""The end of a run: an ``--act-bits`` finetune writes and checks its deployed file
(``model.int8.onnx``, as ``export --precision int8`` writes it), shows its top-1 in onnxruntime
beside the float network's and the next command, and keeps per-layer tables to one line at an
80-column terminal (in full with ``--verbose`` and in report.json). The run's network, prepared
through the public API from its manifest, exports to the same bytes."""

import json

import pytest
import torch
from helpers import SYNTHETIC_32PX, cli

import wnconvert

TINY = [*SYNTHETIC_32PX, "--batch-size", "16", "--samples", "2", "--limit-train", "16",
        "--limit-val", "16", "--epochs", "0", "--weight-bits", "8", "--act-bits", "8"]


@pytest.fixture(scope="module")
def w8a8_run(tmp_path_factory):
    """resnet18 at 32 px, calibrated on synthetic images, not trained; its terminal output."""
    out = tmp_path_factory.mktemp("run_end") / "run"
    torch.manual_seed(0)
    return out, cli("finetune", "resnet18", *TINY, "--out", out).output


def test_act_run_ends_with_its_deployed_file_checked(w8a8_run):
    out, _ = w8a8_run
    report = json.loads((out / "report.json").read_text())
    d = report["deployed"]
    assert (d["file"], d["precision"], d["contract"], d["passed"], d["failures"]) == (
        "model.int8.onnx", "int8", "lossless-activations", True, [])
    assert d["inputs"] == "2 images from synthetic:10" and d["onnx_accuracy"]["images"] == 16
    assert report["quantized"]["int8"]["file"] == "model.int8.onnx"           # export's own record
    assert report["targets"]["model.int8.onnx"]["name"] == "ort-cpu"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "model.int8.onnx" in manifest["artifacts"]
    assert len(report["certificate"]) == 21                                    # in full in report.json
    r = cli("verify", out, "--precision", "int8", "--limit", "4")             # the recorded hashes hold
    assert r.exit_code == 0, r.output


def test_the_summary_fits_80_columns(w8a8_run):
    out, text = w8a8_run
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    report = json.loads((out / "report.json").read_text())
    worst = max(report["certificate"], key=lambda c: c["rel_diff"])
    assert "fold certificate: 21 layers, max |stored| 1.000000, worst rel. diff " \
           f"{worst['rel_diff']:.2e}" in text                                   # one line, not 21 rows
    assert not any(c["layer"] in text for c in report["certificate"] if c is not worst)
    top1 = report["onnx_accuracy"]["top1"], report["deployed"]["onnx_accuracy"]["top1"]
    assert f"float top-1         │ {top1[0]:.4f} model.onnx" in text
    assert f"deployed top-1      │ {top1[1]:.4f} model.int8.onnx (W8A8)" in text
    assert f"next: wnconvert verify {out}" in " ".join(text.split())


def test_verbose_prints_the_tables(w8a8_run, monkeypatch):
    """--verbose: the certificate table in full (no layer name cut at 80 columns) and every file."""
    from rich.console import Console

    from wnconvert.cli import finetune
    from wnconvert.models.run.run import RunSummary
    from wnconvert.models.run.rundir import RunDir

    out, _ = w8a8_run
    run = RunDir(out)
    summary = RunSummary(out, run.manifest(), run.report(), None)
    shown = Console(width=80, record=True)
    monkeypatch.setattr(finetune, "console", shown)
    finetune._print_summary(summary, verbose=True)
    text = shown.export_text()
    assert "Fold certificate" in text and "layer4.1.conv2.weight" in text and "layer4.0.downsample.0.weight" in text
    assert text.count("│ artifact ") == len(summary.manifest.artifacts) == 5  # every file, one row each
    assert max(len(line) for line in text.splitlines()) <= 80


def test_no_deploy(tmp_path):
    r = cli("finetune", "resnet18", "--weights", "none", "--image-size", "32", "--num-classes", "10",
            "--no-deploy", "--out", tmp_path / "a", code=2)
    assert "--no-deploy applies to --act-bits runs only" in r.output and not (tmp_path / "a").exists()
    torch.manual_seed(0)
    cli("finetune", "resnet18", *TINY, "--limit-val", "4", "--no-deploy", "--out", tmp_path / "b")
    assert not (tmp_path / "b" / "model.int8.onnx").exists()
    assert "deployed" not in json.loads((tmp_path / "b" / "report.json").read_text())


def test_the_runs_network_through_the_api_gives_its_file(w8a8_run, tmp_path):
    """The manifest's record loads as a QATConfig; prepare() of the plain network under it takes the
    run's checkpoint as is, and export() writes the bytes finetune (export --precision int8) wrote."""
    from wnconvert.models.zoo.zoo import build_model, load_into, load_state_file

    out, _ = w8a8_run
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = wnconvert.QATConfig.from_dict(manifest)
    assert (cfg.weight_bits, cfg.act_bits, cfg.target) == (8, 8, "ort-cpu")
    assert cfg.act_record() == manifest["act"]
    q = wnconvert.prepare(build_model("resnet18", "none", 10).model.eval(), cfg)
    load_into(q, load_state_file(out / "checkpoint.safetensors"))
    q.eval()
    mine = tmp_path / "api.int8.onnx"
    rep = wnconvert.export(q, mine, example_input=torch.zeros(1, 3, 32, 32))
    assert rep.precision == "int8" and rep.target == "ort-cpu"
    assert mine.read_bytes() == (out / "model.int8.onnx").read_bytes()
    x = torch.randn(4, 3, 32, 32)
    assert wnconvert.verify(q, mine, inputs=x.numpy()).passed
    with pytest.raises(wnconvert.UserInputError, match="tensorrt"):
        wnconvert.export(q, tmp_path / "t.onnx", example_input=x[:1], target="tensorrt")
    assert not (tmp_path / "t.onnx").exists()
