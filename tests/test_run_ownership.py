"""A run directory is owned (write lock), replaced whole (--overwrite) and checked against the
sha256 values its manifest recorded (issue 13 items 1, 2, 8, 9)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_lock import hold_lock
from typer.testing import CliRunner

from wnconvert.cli.main import app
from wnconvert.convert.artifacts import sha256

runner = CliRunner()
TINY = ["resnet18", "--weights", "none", "--num-classes", "10", "--image-size", "32", "--samples", "2"]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    r = invoke("finetune", *TINY, "--epochs", "0", "--out", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def run_dir(base_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("wnconvert: error:")]
    assert len(lines) == 1, output
    return lines[0]


def test_a_second_writer_gets_exit_2_naming_the_holder(run_dir: Path) -> None:
    """finetune --overwrite, export (fp32 and --precision) and verify are refused while another
    process holds the run; the run is untouched and read-only commands still work."""
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
    proc = hold_lock(run_dir)
    try:
        for args in (["finetune", *TINY, "--epochs", "0", "--out", run_dir, "--overwrite"],
                     ["finetune", *TINY, "--epochs", "0", "--out", run_dir],
                     ["export", run_dir], ["export", run_dir, "--precision", "fp16"],
                     ["verify", run_dir]):
            r = invoke(*args)
            assert r.exit_code == 2, (args, r.output)
            assert f"being written by process {proc.pid}" in error_line(r.output)
        after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
        assert after == before
        for args in (["inspect", run_dir, "--require-unit-range"], ["fold", run_dir]):
            r = invoke(*args)
            assert r.exit_code == 0, (args, r.output)
    finally:
        proc.kill()
        proc.wait()
    r = invoke("export", run_dir, "--precision", "fp16")  # the holder is gone: the lock went with it
    assert r.exit_code == 0, r.output


def _perturbed_copy(src: Path, dst: Path) -> None:
    """Another valid ONNX file: one weight of the last initializer moved by one part in 1e6
    (parity would still pass: only the recorded sha256 can tell)."""
    m = onnx.load(str(src))
    init = m.graph.initializer[-1]
    w = numpy_helper.to_array(init).copy()
    w.flat[0] = np.float32(w.flat[0] * (1 + 1e-6) + 1e-9)
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))


def test_verify_refuses_a_swapped_or_missing_artifact(run_dir: Path, tmp_path: Path) -> None:
    _perturbed_copy(run_dir / "model.onnx", tmp_path / "other.onnx")
    shutil.copy(tmp_path / "other.onnx", run_dir / "model.onnx")
    r = invoke("verify", run_dir)
    assert r.exit_code == 3, r.output
    assert "model.onnx does not match the sha256" in error_line(r.output)

    (run_dir / "metrics.jsonl").unlink()
    r = invoke("verify", run_dir)
    assert r.exit_code == 3, r.output
    assert "metrics.jsonl is recorded in manifest.json but missing" in error_line(r.output)


def test_verify_rerecords_what_it_rewrites(run_dir: Path) -> None:
    r = invoke("verify", run_dir)
    assert r.exit_code == 0, r.output
    assert "verify" in json.loads((run_dir / "report.json").read_text())
    recorded = json.loads((run_dir / "manifest.json").read_text())["artifacts"]
    assert "report.json" in recorded
    assert recorded == {name: sha256(run_dir / name) for name in recorded}
    assert invoke("verify", run_dir).exit_code == 0  # and a second verify accepts the first's report


def test_overwrite_replaces_the_run_whole(run_dir: Path) -> None:
    r = invoke("export", run_dir, "--precision", "fp16")
    assert r.exit_code == 0, r.output
    assert (run_dir / "model.fp16.onnx").is_file()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 999, "epoch": 9, "loss": 1.0, "lr": 0.1, "images_per_s": 1.0}) + "\n")
    r = invoke("finetune", *TINY, "--data", "synthetic:10", "--epochs", "1", "--limit-train", "16",
               "--limit-val", "8", "--batch-size", "8", "--workers", "0", "--log-every", "1",
               "--device", "cpu", "--out", run_dir, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (run_dir / "model.fp16.onnx").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec.get("step") for rec in records] == [1, 2, None]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "model.fp16.onnx" not in manifest["artifacts"]
    assert "quantized" not in json.loads((run_dir / "report.json").read_text())
    r = invoke("verify", run_dir)
    assert r.exit_code == 0, r.output


@pytest.fixture
def read_only(run_dir: Path):
    """``run_dir`` made read-only for this process: permission bits for a normal user; for root
    (who ignores them) a read-only bind mount of the directory onto itself."""
    if os.geteuid() != 0:
        run_dir.chmod(0o555)
        yield run_dir
        run_dir.chmod(0o755)
        return
    bind = subprocess.run(["mount", "--bind", str(run_dir), str(run_dir)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip("root without mount privileges cannot make a read-only directory")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(run_dir)], check=True, capture_output=True)
        assert not os.access(run_dir, os.W_OK)
        yield run_dir
    finally:
        subprocess.run(["umount", str(run_dir)], check=True)


def test_verify_of_a_read_only_run_shows_the_result_and_writes_nothing(read_only: Path) -> None:
    report = (read_only / "report.json").read_bytes()
    r = invoke("verify", read_only, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["passed"] is True  # stdout holds the JSON alone
    assert r.stderr.strip() == f"wnconvert: note: {read_only} is not writable; report.json was not updated"
    r = invoke("verify", read_only, "--rtol", "1e-30")  # a failing check still exits by its result
    assert r.exit_code == 3, r.output
    assert "onnx-ort-opt" in r.stdout  # the parity table was shown
    assert (read_only / "report.json").read_bytes() == report
