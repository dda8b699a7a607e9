"""``wnconvert export RUN --target ethos-u55-128`` (and the other Ethos-U targets): the run's int8
.tflite compiled by Arm's Vela (a real Vela process), written beside it, Vela's figures in report.json;
refusals: int4, INT4 tensors, no .tflite, a truncated one, Vela not installed; a changed .tflite
(hash) exits 3."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ethosu.vela")
pytest.importorskip("tflite_micro")

from test_config_file import run_cli
from tflite_tiny import Builder, small_classifier

from wnconvert.convert.ethosu import NPU_OP, read_ops


def _run_with(tmp_path: Path, bare: Path, data: bytes | None) -> Path:
    """A copy of the bare run (its manifest; the checkpoint is not needed) with ``data`` as its .tflite."""
    run = tmp_path / "run"
    run.mkdir()
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest["artifacts"] = {}
    (run / "manifest.json").write_text(json.dumps(manifest))
    if data is not None:
        (run / "model.int8.tflite").write_bytes(data)
    return run


def test_compiles_and_reports(tmp_path, bare_run, capsys):
    run = _run_with(tmp_path, bare_run, small_classifier())
    code, out, err = run_cli("export", run, "--target", "ethos-u55-128", capsys=capsys)
    assert code == 0, err
    assert "3 of 3 operators on the NPU, no CPU fallback" in out.replace("\n", " ")
    dst = run / "model.int8.ethos-u55-128.tflite"
    ops, _ = read_ops(dst.read_bytes(), str(dst))
    assert ops == [NPU_OP]                     # the whole network is one Ethos-U command stream
    fig = json.loads((run / "report.json").read_text())["ethos_u"]["ethos-u55-128"]
    assert fig["operators"] == fig["on_npu"] == 3 and fig["cpu_fallback"] == []
    assert fig["accelerator"] == "Ethos_U55_128" and fig["clock_hz"] == 5e8
    assert fig["cycles_npu"] > 0 and fig["sram_kib"] > 0 and fig["flash_kib"] > 0 and fig["inferences_per_s"] > 0
    assert fig["macs"] >= 8 * 8 * 8 * 27 + 4 * 8    # conv 3x3x3 -> 8 at 8x8, FC 8 -> 4 (and the MEAN's)
    manifest = json.loads((run / "manifest.json").read_text())
    assert dst.name in manifest["artifacts"] and "model.int8.tflite" in manifest["artifacts"]
    # another configuration: its own file and entry, the first kept
    code, out, err = run_cli("export", run, "--target", "ethos-u65-256", "--json", capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["accelerator"] == "Ethos_U65_256"
    assert set(json.loads((run / "report.json").read_text())["ethos_u"]) == {"ethos-u55-128", "ethos-u65-256"}
    # the .tflite changed after its hash was recorded: exit 3 naming it, before Vela runs
    (run / "model.int8.tflite").write_bytes(small_classifier(seed=1))
    code, out, err = run_cli("export", run, "--target", "ethos-u55-128", capsys=capsys)
    assert code == 3 and "model.int8.tflite" in err


def test_cpu_fallback_is_named(tmp_path, bare_run, capsys):
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as S

    b = Builder()
    x = b.tensor((1, 8, 8, 4), np.int8, 0.1, 0)
    h = b.conv(x, np.ones((4, 3, 3, 4), np.int8), [0.01] * 4, np.zeros(4, np.int32), 0.1, 0)
    y = b.tensor((1, 8, 8, 4), np.int8, 0.1, 0)
    b.op(S.BuiltinOperator.SQRT, [h], [y])     # no Ethos-U operator: Vela leaves it to the CPU
    run = _run_with(tmp_path, bare_run, b.finish([x], [y]))
    code, out, err = run_cli("export", run, "--target", "ethos-u55-256", "--json", capsys=capsys)
    assert code == 0, err
    fig = json.loads(out)
    assert fig["cpu_fallback"] == ["SQRT"] and fig["on_npu"] == 1 and fig["operators"] == 2


@pytest.mark.parametrize("case", ["int4", "int4_tensor", "no_file", "truncated", "no_vela"])
def test_refusals_are_one_line_exit_2(tmp_path, bare_run, capsys, monkeypatch, case):
    data = small_classifier()
    args = []
    if case == "int4":
        args = ["--precision", "int4"]
    elif case == "int4_tensor":
        from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as S
        b = Builder()
        x = b.tensor((1, 4, 4, 2), np.int8, 0.1, 0)
        h = b.conv(x, np.ones((2, 1, 1, 2), np.int8), [0.01] * 2, np.zeros(2, np.int32), 0.1, 0)
        b.tensors[1].type = S.TensorType.INT4
        data = b.finish([x], [h])
    elif case == "no_file":
        data = None
    elif case == "truncated":
        data = data[: len(data) // 3]
    elif case == "no_vela":
        monkeypatch.setitem(sys.modules, "ethosu", None)   # as if the npu extra were not installed
        monkeypatch.setitem(sys.modules, "ethosu.vela", None)
    run = _run_with(tmp_path, bare_run, data)
    before = sorted(p.name for p in run.iterdir())
    code, out, err = run_cli("export", run, "--target", "ethos-u55-128", *args, capsys=capsys)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    words = {"int4": "INT4", "int4_tensor": "INT4", "no_file": "--target tflite-micro",
             "truncated": "not a readable .tflite", "no_vela": "pip install 'wnconvert[npu]'"}[case]
    assert words in err
    assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == [n for n in before if n != ".lock"]
