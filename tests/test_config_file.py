"""``finetune --config FILE``: defaults from TOML or a manifest, flags override, unknown keys refused;
and every usage error of the CLI is one line with exit 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wnconvert.cli.main import main

TOML = """
model = "resnet18"
weights = "none"
num-classes = 10
image_size = 32
scheme = "channel-max"
exclude = ["fc"]

[train]
epochs = 0
rtol = 1e-3
"""


def run_cli(*args: object, capsys) -> tuple[int, str, str]:
    """The installed entry point's code path, in-process: (exit code, stdout, stderr)."""
    argv = sys.argv
    sys.argv = ["wnconvert", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def manifest_of(out: str) -> dict:
    return json.loads(out)["manifest"]


def test_toml_defaults_and_flag_override(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(TOML)
    code, out, err = run_cli("finetune", "--config", cfg, "--out", tmp_path / "a", "--scheme",
                             "layer-max", "--no-export", "--json", capsys=capsys)
    assert code == 0, err
    m = manifest_of(out)
    assert (m["model"], m["weights"], m["num_classes"]) == ("resnet18", "none", 10)
    assert m["preprocess"]["image_size"] == 32 and m["verify"]["rtol"] == 1e-3
    assert m["scheme"]["scheme"] == "layer-max"          # the flag wins over the file
    assert m["scheme"]["exclude"] == ["fc"]

    # An earlier run's manifest repeats it; a flag varies it; nothing is taken from its records.
    code, out, err = run_cli("finetune", "--config", tmp_path / "a" / "manifest.json", "--out",
                             tmp_path / "b", "--rtol", "2e-3", "--no-export", "--json",
                             capsys=capsys)
    assert code == 0, err
    m2 = manifest_of(out)
    for key in ("model", "weights", "num_classes", "scheme", "fold", "preprocess"):
        assert m2[key] == m[key], key
    assert m2["verify"]["rtol"] == 2e-3
    code, out, err = run_cli("finetune", "--config", tmp_path / "a", "--out", tmp_path / "c", "--no-export",
                             "--json", capsys=capsys)  # a run directory works too
    assert code == 0, err
    assert manifest_of(out)["verify"]["rtol"] == 1e-3


def test_manifest_repeats_an_act_run(tmp_path: Path, capsys) -> None:
    """Every --act-bits setting comes back from the manifest, --target included."""
    code, out, err = run_cli("finetune", "resnet18", "--weights", "none", "--num-classes", 10, "--image-size", 32,
                             "--data", "synthetic:10", "--epochs", 0, "--samples", 2, "--weight-bits", 8,
                             "--limit-val", 4, "--limit-train", 8, "--batch-size", 4, "--workers", 0,
                             "--act-bits", 6, "--act-range", "frozen", "--target", "openvino", "--no-deploy",
                             "--out", tmp_path / "a", "--json", capsys=capsys)
    assert code == 0, err
    act = manifest_of(out)["act"]
    assert act["bits"] == 6 and act["range"] == "frozen" and act["residual_conv"] == "float"
    code, out, err = run_cli("finetune", "--config", tmp_path / "a", "--out", tmp_path / "b", "--json",
                             "--no-deploy", capsys=capsys)
    assert code == 0, err
    assert manifest_of(out)["act"] == act


@pytest.mark.parametrize("text, match", [
    ('model = "resnet18"\nlearning_rate = 0.1\n', "unknown option 'learning_rate'"),
    ('model = "resnet18"\nout = "elsewhere"\n', "out cannot be set from a config file"),
    ('model = "resnet18"\n[optim]\nlr = 1\n', r"\[optim\] is not a section"),
    ('model = "resnet18"\nlr = 0.1\n[train]\nlr = 0.2\n', "lr is set twice"),
    ('model = \n', "is not a TOML file"),
    ('model = "resnet18"\nepochs = "many"\n', "epochs"),
])
def test_bad_config_is_one_line_exit_2(tmp_path: Path, capsys, text: str, match: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    code, out, err = run_cli("finetune", "--config", cfg, "--out", tmp_path / "r", capsys=capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("wnconvert: error: ")
    assert re.search(match, err), err
    assert not (tmp_path / "r").exists()


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    """Through the real entry point: a bad value, a missing argument, an unknown command."""
    for args in (["finetune", "resnet18", "--epochs", "abc"], ["finetune"], ["nosuch"]):
        proc = subprocess.run([sys.executable, "-m", "wnconvert.cli", *args], capture_output=True,
                              text=True, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert proc.stderr.startswith("wnconvert: error: "), proc.stderr
