"""The CLI end to end: real files, real onnxruntime sessions, one-line errors and exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from helpers import randomize
from onnx import numpy_helper
from typer.testing import CliRunner

from wnconvert.cli.main import app
from wnconvert.convert.runtime import run_onnx

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    """state_dicts with non-trivial BatchNorm statistics, 1000 classes (the head gets replaced)."""
    d = tmp_path_factory.mktemp("weights")
    out = {}
    for name in ("resnet18", "mobilenet_v3_small", "squeezenet1_1"):
        torch.manual_seed(0)
        m = randomize(torchvision.models.get_model(name))
        out[name] = d / f"{name}.pth"
        torch.save(m.state_dict(), out[name])
    st = d / "resnet18.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in torch.load(out["resnet18"]).items()}, str(st))
    out["resnet18-st"] = st
    return out


def _original(name, path, num_classes):
    """What the tool should reproduce: the model with the file loaded and the head replaced."""
    from wnconvert.models.zoo.zoo import build_model
    torch.manual_seed(0)
    return build_model(name, str(path), num_classes).model.eval()


@pytest.mark.parametrize("name,scheme,bn", [
    ("resnet18", "layer-max", "keep"),
    ("mobilenet_v3_small", "channel-max", "fold"),
    ("squeezenet1_1", "weight-norm", "keep"),
])
def test_finetune_epochs0_reproduces_original(sd_files, tmp_path, name, scheme, bn):
    out = tmp_path / "run"
    r = invoke("finetune", name, "--weights", sd_files[name], "--num-classes", 10, "--scheme", scheme,
               "--bn", bn, "--epochs", 0, "--image-size", 64, "--out", out)
    assert r.exit_code == 0, r.output
    for f in ("model.onnx", "manifest.json", "report.json", "checkpoint.safetensors"):
        assert (out / f).is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["num_classes"] == 10
    assert manifest["preprocess"]["image_size"] == 64
    assert set(manifest["artifacts"]) >= {"model.onnx", "report.json", "checkpoint.safetensors"}
    # The ONNX, in onnxruntime, gives the logits of the original model (its new head included).
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["passed"] and report["parity_vs_original"]["passed"]
    # The new head is random: compare with the run's own checkpoint, evaluated in PyTorch.
    from wnconvert.models.run.run import load_run
    _, reparam, _ = load_run(out)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        ref = reparam(x).numpy()
    for opt in (False, True):
        got = run_onnx(out / "model.onnx", x.numpy(), optimized=opt)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
        assert (got.argmax(1) == ref.argmax(1)).all()
    # every Conv/Gemm/MatMul weight initializer in [-1, 1]
    r = invoke("inspect", out / "model.onnx", "--require-unit-range")
    assert r.exit_code == 0, r.output


def test_safetensors_weights_and_parity_against_original(sd_files, tmp_path):
    out = tmp_path / "st"
    r = invoke("finetune", "resnet18", "--weights", sd_files["resnet18-st"], "--epochs", 0,
               "--image-size", 32, "--scheme", "weight-std", "--out", out)
    assert r.exit_code == 0, r.output
    original = _original("resnet18", sd_files["resnet18"], None)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = original(x).numpy()
    got = run_onnx(out / "model.onnx", x.numpy())
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_fold_export_verify_commands_on_a_run(sd_files, tmp_path):
    out = tmp_path / "run"
    assert invoke("finetune", "resnet18", "--weights", sd_files["resnet18"], "--num-classes", 10,
                  "--epochs", 0, "--image-size", 32, "--out", out).exit_code == 0
    r = invoke("fold", out, "--bn", "fold", "--json")
    assert r.exit_code == 0, r.output
    cert = json.loads(r.output)["certificate"]
    assert all(c["stored_max_abs"] <= 1 for c in cert) and any("folded" in c["scale"] for c in cert)
    r = invoke("export", out, "--bn", "fold")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["fold"]["bn"] == "fold"
    r = invoke("verify", out, "--json", "--samples", 4)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["passed"] is True
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32))
    assert invoke("verify", out, "--inputs", tmp_path / "x.npy").exit_code == 0


def test_verify_fails_with_exit_3_on_a_tampered_onnx(sd_files, tmp_path):
    out = tmp_path / "run"
    assert invoke("finetune", "resnet18", "--weights", sd_files["resnet18"], "--epochs", 0,
                  "--image-size", 32, "--out", out).exit_code == 0
    model = onnx.load(str(out / "model.onnx"))
    init = next(i for i in model.graph.initializer if i.name.endswith("conv1.weight") or "Conv" in i.name)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] = -arr.flat[0] if arr.flat[0] != 0 else 0.5
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    r = invoke("verify", out, "--onnx", tmp_path / "bad.onnx")
    assert r.exit_code == 3
    assert "parity failed" in r.output


def test_inspect_flags_out_of_range(tmp_path):
    torch.save({"conv.weight": torch.full((2, 2, 1, 1), 3.0), "bn.running_var": torch.ones(2)},
               tmp_path / "sd.pth")
    r = invoke("inspect", tmp_path / "sd.pth", "--require-unit-range")
    assert r.exit_code == 4
    assert "outside [-1, 1]" in r.output


def test_schemes_and_models_listing():
    r = invoke("schemes", "--json")
    assert set(json.loads(r.output)) == {"layer-max", "channel-max", "weight-std", "weight-norm", "none"}
    r = invoke("models", "--json")
    names = json.loads(r.output)
    listed = torchvision.models.list_models(module=torchvision.models)
    assert "resnet50" in names and "vit_b_16" in names and len(names) == len(listed)


# -- bad input: one line, non-zero exit, no traceback, nothing half-written -----------------------

def run_cli(*args, cwd=None):
    """The installed console script in a subprocess, to see exactly what a user sees."""
    exe = Path(sys.executable).with_name("wnconvert")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def assert_one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for n in needles:
        assert n in err[0], err[0]


def test_unknown_model_suggests_close_names(tmp_path):
    p = run_cli("finetune", "resnet5", "--weights", "none", "--out", tmp_path / "o")
    assert_one_line_error(p, 2, "unknown model 'resnet5'", "resnet50")
    assert not (tmp_path / "o").exists()


def test_unknown_scheme(tmp_path):
    p = run_cli("finetune", "resnet18", "--scheme", "layer_max", "--weights", "none", "--out", tmp_path / "o")
    assert_one_line_error(p, 2, "unknown scheme", "layer-max")


def test_unknown_schedule(tmp_path):
    p = run_cli("finetune", "resnet18", "--weights", "none", "--data", "synthetic", "--schedule", "step",
                "--out", tmp_path / "o")
    assert_one_line_error(p, 2, "unknown schedule 'step'", "constant")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content,needle", [
    (None, "does not exist"),
    (b"this is not a checkpoint", "cannot read weights file"),
    ("mismatch", "does not fit resnet18"),
])
def test_bad_weights_files(tmp_path, content, needle):
    path = tmp_path / "w.pth"
    if content == "mismatch":
        torch.save(torchvision.models.resnet34().state_dict(), path)
    elif content is not None:
        path.write_bytes(content)
    out = tmp_path / "o"
    p = run_cli("finetune", "resnet18", "--weights", path, "--epochs", 0, "--out", out)
    assert_one_line_error(p, 2, needle)
    assert not out.exists()


def test_pretrained_weights_not_cached_names_the_file(tmp_path, monkeypatch):
    p = subprocess.run([str(Path(sys.executable).with_name("wnconvert")), "finetune", "resnet18",
                        "--weights", "DEFAULT", "--out", str(tmp_path / "o")], capture_output=True,
                       text=True, env={"TORCH_HOME": str(tmp_path / "hub"), "PATH": "/usr/bin:/bin",
                                       "WNCONVERT_OFFLINE": "1"})
    assert_one_line_error(p, 2, "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                          str(tmp_path / "hub"))


def test_unwritable_output(tmp_path):
    (tmp_path / "file").write_text("x")
    p = run_cli("finetune", "resnet18", "--weights", "none", "--epochs", 0, "--out", tmp_path / "file" / "run")
    assert_one_line_error(p, 2, "not a directory")


def test_existing_run_is_not_overwritten(sd_files, tmp_path):
    out = tmp_path / "run"
    assert invoke("finetune", "resnet18", "--weights", sd_files["resnet18"], "--epochs", 0,
                  "--image-size", 32, "--out", out).exit_code == 0
    before = (out / "model.onnx").read_bytes()
    p = run_cli("finetune", "resnet18", "--weights", "none", "--epochs", 0, "--image-size", 32, "--out", out)
    assert_one_line_error(p, 2, "already holds a run")
    assert (out / "model.onnx").read_bytes() == before


def test_verify_on_a_non_run_directory(tmp_path):
    p = run_cli("verify", tmp_path)
    assert_one_line_error(p, 2, "manifest.json")


def test_state_without_module_versions_loads(tmp_path):
    """MNASNet checks the version in a state_dict's metadata; safetensors files have none."""
    from safetensors.torch import save_file
    m = torchvision.models.mnasnet0_5(num_classes=10)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "m.safetensors"))
    out = tmp_path / "run"
    r = invoke("finetune", "mnasnet0_5", "--weights", tmp_path / "m.safetensors", "--epochs", 0,
               "--image-size", 32, "--out", out)
    assert r.exit_code == 0, r.output
    assert invoke("verify", out, "--samples", 2).exit_code == 0  # reloads checkpoint.safetensors
