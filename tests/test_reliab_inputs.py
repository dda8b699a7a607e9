"""Issue 22, the input side: one guarded reader (convert/reading.py) for configs, manifests,
reports and ONNX files; one manifest-version rule; config types; --resume --workers; the lock
before any model or data loads; golden's bounds; the download's total timeout and its schemes."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers import SYNTHETIC_32PX
from typer.testing import CliRunner

from wnconvert.cli.main import app
from wnconvert.convert import reading
from wnconvert.convert.errors import ParityError, UserInputError

TINY = [*SYNTHETIC_32PX, "--epochs", "1", "--limit-train", "8", "--limit-val", "8"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(r, code: int) -> str:
    assert r.exit_code == code, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output and "internal error" not in r.output, r.output
    return lines[0]


# -- the guarded reader ---------------------------------------------------------------------------

def test_reader_refuses_devices_fifos_and_directories(tmp_path):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path, words in (("/dev/zero", "not a regular file"), (fifo, "not a regular file"),
                        (tmp_path, "is a directory"), (tmp_path / "none.json", "does not exist")):
        t = time.perf_counter()
        with pytest.raises(UserInputError, match=words):
            reading.read_bytes(path, "config")
        assert time.perf_counter() - t < 1  # refused before reading (a FIFO would block on open)
    with pytest.raises(ParityError, match="not a regular file"):  # a caller with a contract at stake
        reading.load_onnx("/dev/zero", error=ParityError)


def test_reader_refuses_a_file_over_its_bound_without_reading_it(tmp_path):
    big = tmp_path / "big.toml"
    with open(big, "wb") as f:  # sparse: 200 MB announced, nothing written
        f.truncate(200 * reading.MiB)
    t = time.perf_counter()
    with pytest.raises(UserInputError, match=r"200 MiB, larger than the 1 MiB a config may have"):
        reading.read_bytes(big, "config")
    assert time.perf_counter() - t < 0.5
    ok = tmp_path / "ok.json"
    ok.write_text('{"a": 1}')
    assert reading.read_json(ok, "manifest") == {"a": 1}
    ok.write_text('{"a": ')
    with pytest.raises(UserInputError, match="ok.json: not a manifest"):
        reading.read_json(ok, "manifest")


def test_truncated_onnx_is_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    path = tmp_path / "m.onnx"
    raw = model.SerializeToString()
    path.write_bytes(raw)
    assert reading.load_onnx(path).graph.node[0].op_type == "Relu"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserInputError, match="m.onnx is not a readable ONNX file"):
        reading.load_onnx(path)
    assert isinstance(onnx.ModelProto(), onnx.ModelProto)


@pytest.mark.parametrize("make, words", [
    (lambda p: "/dev/zero", "not a regular file"),
    (lambda p: (p / "r" / "manifest.json").mkdir(parents=True) or p / "r", "is a directory"),
    (lambda p: _sparse(p / "big.toml", 200), "larger than the 1 MiB"),
])
def test_finetune_config_is_bounded(tmp_path, make, words):
    t = time.perf_counter()
    r = cli("finetune", "resnet18", "--config", make(tmp_path), "--out", tmp_path / "run")
    assert words in one_line(r, 2)
    assert time.perf_counter() - t < 10 and not (tmp_path / "run").exists()


def _sparse(path: Path, mib: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(mib * reading.MiB)
    return path


# -- one manifest-version rule; config types ------------------------------------------------------

def test_config_from_a_newer_manifest_is_refused(tmp_path):
    manifest = {"version": 99, "model": "resnet18", "num_classes": 10, "scheme": {"scheme": "channel-max"}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    r = cli("finetune", "resnet18", "--config", tmp_path / "manifest.json", "--out", tmp_path / "run")
    assert "manifest version 99" in one_line(r, 2)
    # the same rule as every run reader (verify, export, eval, --resume go through RunDir.manifest)
    from wnconvert.models.run.rundir import RunDir
    with pytest.raises(UserInputError, match="manifest version 99"):
        RunDir(tmp_path).manifest()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("line, words", [("act-bits = true", "is a boolean"), ("act-bits = 8.5", "not an integer"),
                                         ("nesterov = 1", "not true or false")])
def test_config_values_of_the_wrong_type_are_refused(tmp_path, line, words):
    cfg = tmp_path / "c.toml"
    cfg.write_text(line + "\n")
    r = cli("finetune", "resnet18", "--config", cfg, "--out", tmp_path / "run")
    assert words in one_line(r, 2)


def test_resume_takes_workers(tmp_path):
    """README: --resume continues exactly with any --workers; the option is no longer refused
    (the run here does not exist, so the error is about the run, not about --workers)."""
    r = cli("finetune", "resnet18", "--resume", tmp_path / "nothing", "--workers", "3")
    line = one_line(r, 2)
    assert "--workers" not in line and "nothing" in line
    r = cli("finetune", "resnet18", "--resume", tmp_path / "nothing", "--epochs", "3")
    assert "--epochs" in one_line(r, 2)  # other options are still refused


# -- the lock, before any model or data loads ---------------------------------------------------

def _stub_run(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"version": 1, "status": "complete"}))


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_locked_run_refused_before_loading(tmp_path, monkeypatch, flag):
    from wnconvert.models.run import lock
    from wnconvert.models.run import run as run_mod

    out = tmp_path / "run"
    _stub_run(out)
    loaded = []
    monkeypatch.setattr(run_mod, "build_model", lambda *a, **k: loaded.append(a) or 1 / 0)
    monkeypatch.setattr(run_mod, "build_data", lambda *a, **k: loaded.append(a) or 1 / 0)
    fd = lock.acquire(out)
    try:
        if flag == "--overwrite":
            r = cli("finetune", "resnet18", *TINY, "--out", out, "--overwrite")
        else:
            from wnconvert.models.run.run import RunConfig, finetune_process
            from wnconvert.models.train.train_config import TrainConfig
            cfg = RunConfig(model="resnet18", out=out, weights="none", num_classes=10, data="synthetic:10",
                            train=TrainConfig(epochs=1, workers=0, device="cpu"))
            with pytest.raises(UserInputError) as e:
                finetune_process(cfg, resume=True)
            r = None
        line = one_line(r, 2) if r is not None else str(e.value)
    finally:
        lock.release(fd)
    assert f"process {os.getpid()}" in line and not loaded
    assert ("another --out" in line) == (flag == "--overwrite")


@pytest.mark.parametrize("command", [["export", "--precision", "int8"], ["verify"]])
def test_lock_message_fits_export_and_verify(tmp_path, command):
    from wnconvert.models.run import lock

    out = tmp_path / "run"
    _stub_run(out)
    fd = lock.acquire(out)
    try:
        r = cli(command[0], out, *command[1:])
    finally:
        lock.release(fd)
    line = one_line(r, 2)
    assert "being written by process" in line and "--out" not in line


# -- golden bounds ----------------------------------------------------------------------------------

def test_golden_count_and_out_are_bounded(tmp_path):
    from wnconvert.models.run.precheck import MAX_GOLDEN_COUNT as MAX_COUNT

    run = tmp_path / "run"
    other = tmp_path / "other"
    _stub_run(other)
    r = cli("golden", run, "--out", tmp_path / "g", "--count", MAX_COUNT + 1)
    assert f"between 1 and {MAX_COUNT}" in one_line(r, 2)
    assert not (tmp_path / "g").exists()
    before = sorted(p.name for p in other.iterdir())
    r = cli("golden", run, "--out", other, "--count", 4)
    assert "is a run directory" in one_line(r, 2)
    assert sorted(p.name for p in other.iterdir()) == before


# -- download: total timeout, schemes ---------------------------------------------------------------

def _trickle_server(stop: threading.Event) -> int:
    """HTTP on 127.0.0.1 announcing 1000 bytes and sending one every 0.2 s."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve():
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n")
            while not stop.is_set():
                try:
                    conn.sendall(b"x")
                except OSError:
                    return
                time.sleep(0.2)
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def test_download_timeout_covers_the_whole_transfer(tmp_path, monkeypatch):
    from wnconvert.models.zoo import download

    monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    stop = threading.Event()
    port = _trickle_server(stop)
    monkeypatch.setenv(download.BASE_URL_ENV, f"http://127.0.0.1:{port}/")
    monkeypatch.setenv(download.TIMEOUT_ENV, "1.5")
    t = time.perf_counter()
    try:
        with pytest.raises(UserInputError, match=r"not complete within 1.5 s"):
            download.fetch_weights("https://example.invalid/x/w-abcdef12.pth")
    finally:
        stop.set()
    assert 1.4 < time.perf_counter() - t < 4   # each byte came within the stall timeout
    assert list((tmp_path / "torch" / "hub" / "checkpoints").iterdir()) == []


def test_download_refuses_other_schemes(tmp_path, monkeypatch):
    from wnconvert.models.zoo import download

    monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(download.BASE_URL_ENV, "ftp://127.0.0.1/models")
    with pytest.raises(UserInputError, match="unsupported scheme 'ftp'"):
        download.fetch_weights("https://example.invalid/x/w-abcdef12.pth")


def test_sigterm_during_start_up_is_one_line_and_130(tmp_path):
    """Issue 22, item 9: SIGTERM before training installs its handler (here: while torch loads)."""
    import signal
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("wnconvert")
    env = {**os.environ, "WNCONVERT_OFFLINE": "1"}
    p = subprocess.Popen([str(exe), "finetune", "resnet18", *TINY, "--out", str(tmp_path / "run")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, err)
    assert err.strip().splitlines()[-1] == "wnconvert: error: interrupted by SIGTERM", err


# -- item 0: the logits of a legitimate file within what the ties before the classifier allow ------

def test_a_flip_inside_the_tie_bound_passes_and_one_beyond_it_fails():
    """The false alarm of item 0: a one-step tie before a float classifier moves the logits by
    up to that step times the row's weights, far more than one output step. Judged by the old
    "lead above one step" rule the flip below fails; within the per-image bound it passes; a
    logit moved beyond the bound still fails."""
    import numpy as np

    from wnconvert.convert.actquant.logits import compare_logits

    ref = np.array([[1.00, 0.95, 0.0], [0.2, 0.9, 0.1]])
    got = np.array([[0.96, 0.99, 0.0], [0.2, 0.9, 0.1]])      # image 0: top-1 flipped by 0.04
    bound = np.full_like(ref, 0.05)
    assert compare_logits(ref, got, got, bound, step=0.01)["failures"] == []
    old_rule = compare_logits(ref, got, got, None, step=0.01)   # no classifier bound: one step of lead
    assert old_rule["disagree"] == 1 and any("top-1 differs" in f for f in old_rule["failures"])
    moved = np.array([[0.90, 1.00, 0.0], [0.2, 0.9, 0.1]])    # 0.10 > the bound
    beyond = compare_logits(ref, moved, moved, bound, step=0.01)
    assert beyond["bound"]["images_beyond"] == 1 and any("beyond" in f for f in beyond["failures"])
