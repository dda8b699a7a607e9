"""Corrupt manifests and checkpoints, unusable ONNX files and a full disk are exit 2 with one
line, never an internal error (issue 13 item 11)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx.external_data_helper import convert_model_to_external_data
from typer.testing import CliRunner

from wnconvert.cli.main import app
from wnconvert.convert.errors import UserInputError
from wnconvert.models.run.rundir import RunDir
from wnconvert.models.train import checkpoint as ckpt

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    r = invoke("finetune", "resnet18", "--weights", "none", "--num-classes", "10", "--image-size", "32",
               "--samples", "2", "--data", "synthetic:10", "--limit-train", "16", "--limit-val", "8",
               "--batch-size", "8", "--workers", "0", "--epochs", "1", "--device", "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    return out


def _identity_onnx(path: Path, size: int) -> None:
    """A valid ONNX file whose input is (N, 3, size, size): not the run's input shape."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, size, size])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _external(run: Path, tmp: Path, location: str) -> None:
    """tmp/sub/m.onnx: the run's model with its weights in external data that ``location`` names;
    the data itself is written to tmp/other/w.bin (outside sub/)."""
    model = onnx.load(str(run / "model.onnx"))
    (tmp / "other").mkdir()
    (tmp / "sub").mkdir()
    convert_model_to_external_data(model, location="w.bin", size_threshold=0)
    onnx.save(model, str(tmp / "other" / "m.onnx"))
    model = onnx.load(str(tmp / "other" / "m.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location.format(tmp=tmp)
    onnx.save(model, str(tmp / "sub" / "m.onnx"))


def _link_out(run: Path, tmp: Path) -> None:
    _external(run, tmp, "w.bin")
    (tmp / "sub" / "w.bin").symlink_to(tmp / "other" / "w.bin")


def _manifest(run: Path, change) -> None:
    path = run / "manifest.json"
    if callable(change):
        d = json.loads(path.read_text())
        change(d)
        path.write_text(json.dumps(d))
    else:
        path.write_bytes(change)


def _last_pt(run: Path, change) -> None:
    path = run / "train" / "last.pt"
    saved = torch.load(path, weights_only=True)
    change(saved)
    torch.save(saved, path)


CASES = {
    "manifest not UTF-8": (lambda run, tmp: _manifest(run, b'\xff\xfe{"model": 1}'), ["fold", "{run}"], "cannot read"),
    "manifest not an object": (lambda run, tmp: _manifest(run, b"[1, 2]"), ["fold", "{run}"], "is not a JSON object"),
    "manifest num_classes a string": (lambda run, tmp: _manifest(run, lambda d: d.update(num_classes="ten")),
                                      ["fold", "{run}"], "'num_classes' has the wrong type"),
    "manifest artifacts a list": (lambda run, tmp: _manifest(run, lambda d: d.update(artifacts=[1])),
                                  ["verify", "{run}"], "'artifacts' has the wrong type"),
    "last.pt without scheduler": (lambda run, tmp: _last_pt(run, lambda s: s.pop("scheduler")),
                                  ["finetune", "resnet18", "--resume", "{run}"], "lacks 'scheduler'"),
    "last.pt with a string step": (lambda run, tmp: _last_pt(run, lambda s: s.update(step="7")),
                                   ["finetune", "resnet18", "--resume", "{run}"], "'step' has the wrong type"),
    "verify --onnx 0 bytes": (lambda run, tmp: (tmp / "x.onnx").write_bytes(b""),
                              ["verify", "{run}", "--onnx", "{tmp}/x.onnx"], "onnxruntime cannot load"),
    "verify --onnx other shape": (lambda run, tmp: _identity_onnx(tmp / "x.onnx", 8),
                                  ["verify", "{run}", "--onnx", "{tmp}/x.onnx"], "onnxruntime cannot run"),
    "verify --onnx, external data in ../": (lambda run, tmp: _external(run, tmp, "../other/w.bin"),
                                             ["verify", "{run}", "--onnx", "{tmp}/sub/m.onnx"],
                                             "'../other/w.bin', outside the model's folder"),
    "verify --onnx, external data by absolute path": (
        lambda run, tmp: _external(run, tmp, "{tmp}/other/w.bin"),
        ["verify", "{run}", "--onnx", "{tmp}/sub/m.onnx"], "only a relative path inside"),
    "eval, external data linked out of the folder": (
        _link_out, ["eval", "{tmp}/sub/m.onnx", "--data", "synthetic:10", "--limit", "4"],
        "'w.bin', outside the model's folder"),
    "inspect, external data missing": (lambda run, tmp: _external(run, tmp, "nothing.bin"),
                                       ["inspect", "{tmp}/sub/m.onnx"], "'nothing.bin', which is not a file"),
    "eval of another shape": (lambda run, tmp: _identity_onnx(tmp / "x.onnx", 16),
                              ["eval", "{tmp}/x.onnx", "--data", "synthetic:10", "--limit", "4"],
                              "not (batch, classes) logits"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_is_one_line_exit_2(trained: Path, tmp_path: Path, case: str) -> None:
    make, args, message = CASES[case]
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    make(run, tmp_path)
    report = (run / "report.json").read_bytes()
    r = invoke(*(a.format(run=run, tmp=tmp_path) for a in args))
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert (run / "report.json").read_bytes() == report  # nothing recorded


def test_external_data_inside_its_folder_is_read(trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _external(run, tmp_path, "w.bin")
    shutil.copy(tmp_path / "other" / "w.bin", tmp_path / "sub" / "w.bin")
    report = (run / "report.json").read_bytes()
    r = invoke("verify", run, "--onnx", tmp_path / "sub" / "m.onnx")
    assert r.exit_code == 0, r.output
    assert (run / "report.json").read_bytes() != report  # the result was recorded


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 1 MiB tmpfs: a full disk for writers (root only)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_is_one_line_naming_the_file(tiny_disk: Path) -> None:
    model = torch.nn.Linear(1024, 512)  # 2 MiB of weights
    with pytest.raises(UserInputError, match=r"cannot write .*checkpoint\.safetensors") as e:
        RunDir(tiny_disk).save_model_state(model)
    assert "\n" not in str(e.value)
    with pytest.raises(UserInputError, match=r"cannot write .*last\.pt") as e:
        ckpt.save_atomic({"model": model.state_dict()}, tiny_disk / "last.pt")
    assert "\n" not in str(e.value)
    assert list(tiny_disk.iterdir()) == []  # no temporary file left behind
