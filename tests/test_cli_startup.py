"""The command line starts without torch, onnx or onnxruntime: ``--help`` of every command and a
parser error run in a fresh interpreter that then lists the heavy modules it loaded (none may be).
The static name lists the CLI builds its choices from are checked against the heavy registries."""

import json
import os
import subprocess
import sys

import pytest

from wnconvert.convert import names
from wnconvert.convert.quantize.targets import PRESETS
from wnconvert.convert.schemes import REGISTRY

HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "openvino", "numpy")

# Runs in the child: the loaded heavy modules, as the last line of stdout, whatever the exit.
REPORT = ("import atexit, json, sys\n"
          f"atexit.register(lambda: print(json.dumps([m for m in {HEAVY!r} if m in sys.modules])))\n")

HELPS = REPORT + """
import typer
from wnconvert.cli.main import app
commands = sorted(typer.main.get_command(app).commands)
codes = {}
for argv in [["--help"]] + [[c, "--help"] for c in commands]:
    try:
        app(argv)
    except SystemExit as e:
        codes[" ".join(argv)] = e.code
print(json.dumps(codes))
"""


def child(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_every_help_loads_no_heavy_module():
    out = child(HELPS)
    assert out.returncode == 0, out.stderr
    *_, codes, loaded = out.stdout.strip().splitlines()
    codes = json.loads(codes)
    assert {"--help", "finetune --help", "export --help", "verify --help", "golden --help",
            "eval --help", "inspect --help"} <= set(codes)
    assert set(codes.values()) == {0}, codes
    assert "--precision" in out.stdout and "fp32|fp16|int8|int4" in out.stdout  # export's help was shown
    assert json.loads(loaded) == []


@pytest.mark.parametrize("argv, message", [
    (["export", "RUN", "--precision", "bogus"], "unknown precision 'bogus'; choose one of: fp32, fp16, int8, int4"),
    (["finetune", "resnet18", "--no-such-option"], "No such option: --no-such-option"),
    (["verify"], "Missing argument 'run_dir'."),
])
def test_parser_error_loads_no_heavy_module(argv, message):
    out = child(REPORT + "from wnconvert.cli.main import main\nsys.argv = ['wnconvert', *sys.argv[1:]]\nmain()",
                *argv)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"wnconvert: error: {message}"]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_static_names_equal_the_registries():
    """The CLI's choices of --scheme and --target are these static lists; the registries (code,
    torch) are where a scheme or a target is added: they must not drift apart."""
    assert names.SCHEME_NAMES == tuple(REGISTRY)
    assert set(names.WEIGHT_BITS_SCHEMES) <= set(REGISTRY)
    assert names.TARGETS == tuple(PRESETS)
    assert names.DEFAULT_TARGET in PRESETS
