"""Pretrained weights downloaded into the torch hub cache, from a server on 127.0.0.1 only.

conftest.py turns downloads off for every test; the tests here turn them back on and point
``WNCONVERT_WEIGHTS_BASE_URL`` (the documented mirror setting) at a local server.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torchvision

from wnconvert.convert.errors import UserInputError
from wnconvert.models.zoo import download
from wnconvert.models.zoo.zoo import build_model

SQUEEZE = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
REAL_NAME = Path(SQUEEZE.url).name          # squeezenet1_1-b8a52dc0.pth


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory: Path, short_by: int = 0):
    """An HTTP server on 127.0.0.1 (ephemeral port) for ``directory``; yields (base URL, requests).
    ``short_by`` > 0: every answer announces that many bytes more than it sends."""
    requests: list[str] = []

    class Handler(_Quiet):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(directory), **k)

        def do_GET(self):
            requests.append(self.path)
            if not short_by:
                return super().do_GET()
            body = (directory / Path(self.path).name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + short_by))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}/", requests
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Downloads on, an empty torch hub cache under tmp_path; returns its checkpoints folder."""
    monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def state_file(folder: Path, name: str | None = None, seed: int = 0) -> tuple[Path, dict]:
    """A real squeezenet1_1 state_dict saved as ``name`` (default: named by its own sha256)."""
    torch.manual_seed(seed)
    state = torchvision.models.squeezenet1_1().state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp.pth"
    torch.save(state, tmp)
    name = name or f"squeezenet1_1-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    return tmp.rename(folder / name), state


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_build_model_downloads_into_the_hub_cache(hub, tmp_path, monkeypatch):
    """End to end through build_model: the DEFAULT weights entry's file comes from the mirror,
    lands in the hub cache under its name, and is what the model holds."""
    served, state = state_file(tmp_path / "mirror")
    # torchvision's table names a 4.7 MB file we cannot serve; name ours, hash-correct, instead.
    monkeypatch.setattr(SQUEEZE.value, "url", f"https://download.pytorch.org/models/{served.name}")
    with serve(served.parent) as (base, requests):
        monkeypatch.setenv(download.BASE_URL_ENV, base)
        built = build_model("squeezenet1_1", "DEFAULT", num_classes=10)
    assert requests == [f"/{served.name}"]
    assert sorted(p.name for p in hub.iterdir()) == [served.name]     # no temporary file left
    assert (hub / served.name).read_bytes() == served.read_bytes()
    got = built.model.state_dict()
    assert torch.equal(got["features.0.weight"], state["features.0.weight"])
    assert got["classifier.1.weight"].shape[0] == 10 and built.weights == str(SQUEEZE)
    # now cached: no network needed, even offline
    assert torch.equal(build_model("squeezenet1_1", "DEFAULT", offline=True).model.state_dict()[
        "classifier.1.weight"], state["classifier.1.weight"])


def test_wrong_hash_is_refused_and_not_kept(hub, tmp_path, monkeypatch):
    """A file served under torchvision's real name whose content is not that file."""
    state_file(tmp_path / "mirror", REAL_NAME)
    with serve(tmp_path / "mirror") as (base, requests):
        monkeypatch.setenv(download.BASE_URL_ENV, base)
        with pytest.raises(UserInputError, match="b8a52dc0… its name promises: not kept") as e:
            build_model("squeezenet1_1", "DEFAULT")
    assert len(requests) == 1 and "\n" not in str(e.value)
    assert list(hub.iterdir()) == []


def test_truncated_download_is_not_kept(hub, tmp_path, monkeypatch):
    served, _ = state_file(tmp_path / "mirror")
    with serve(served.parent, short_by=100) as (base, _requests):
        monkeypatch.setenv(download.BASE_URL_ENV, base)
        with pytest.raises(UserInputError, match="ended after .* bytes"):
            download.fetch_weights(f"https://example.invalid/models/{served.name}")
    assert list(hub.iterdir()) == []


def test_offline_forbids_the_network(hub, tmp_path, monkeypatch):
    """WNCONVERT_OFFLINE=1 or offline=True: one line naming URL, file and folder, no request;
    offline=False overrides the environment."""
    served, _ = state_file(tmp_path / "mirror", REAL_NAME)
    with serve(served.parent) as (base, requests):
        monkeypatch.setenv(download.BASE_URL_ENV, base)
        with pytest.raises(UserInputError) as e:
            build_model("resnet18", "DEFAULT", offline=True)
        monkeypatch.setenv(download.OFFLINE_ENV, "1")
        with pytest.raises(UserInputError):
            build_model("squeezenet1_1", "DEFAULT")
        assert requests == []
        with pytest.raises(UserInputError, match="not kept"):      # reached the server
            build_model("squeezenet1_1", "DEFAULT", offline=False)
        assert requests == [f"/{REAL_NAME}"]
    msg = str(e.value)
    assert f"{base}resnet18-f37072fd.pth" in msg and str(hub) in msg and "\n" not in msg


def test_closed_port_fails_fast_in_one_line(hub, monkeypatch):
    monkeypatch.setenv(download.BASE_URL_ENV, f"http://127.0.0.1:{closed_port()}/models")
    t = time.perf_counter()
    with pytest.raises(UserInputError, match="Connection refused") as e:
        download.fetch_weights(SQUEEZE.url)
    assert time.perf_counter() - t < 5
    assert f"/models/{REAL_NAME}" in str(e.value) and str(hub) in str(e.value)
    assert not hub.exists() or list(hub.iterdir()) == []


def test_silent_server_times_out(hub, monkeypatch):
    """A server that accepts and never answers: gives up after WNCONVERT_DOWNLOAD_TIMEOUT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setenv(download.BASE_URL_ENV, f"http://127.0.0.1:{s.getsockname()[1]}/")
        monkeypatch.setenv(download.TIMEOUT_ENV, "0.5")
        t = time.perf_counter()
        with pytest.raises(UserInputError, match=r"no answer within 0.5 s"):
            download.fetch_weights(SQUEEZE.url)
        assert time.perf_counter() - t < 5
    assert list(hub.iterdir()) == []


def test_file_mirror_and_progress_on_stderr_only(hub, tmp_path, monkeypatch, capsys):
    served, _ = state_file(tmp_path / "mirror")
    monkeypatch.setenv(download.BASE_URL_ENV, served.parent.as_uri())
    path = download.fetch_weights(f"https://example.invalid/x/{served.name}", progress=True)
    assert path == hub / served.name and path.read_bytes() == served.read_bytes()
    out = capsys.readouterr()
    assert out.out == "" and served.name in out.err
    path.unlink()
    download.fetch_weights(f"https://example.invalid/x/{served.name}")   # not a terminal: silent
    assert capsys.readouterr().err == "" and path.is_file()


def run_cli(*args, env):
    exe = Path(sys.executable).with_name("wnconvert")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("case", ["offline", "--offline", "closed-port"])
def test_cli_one_line_and_exit_2(tmp_path, case):
    base = f"http://127.0.0.1:{closed_port()}/m"
    env = {"PATH": "/usr/bin:/bin", "TORCH_HOME": str(tmp_path / "torch"), "no_proxy": "127.0.0.1",
           download.BASE_URL_ENV: base, download.OFFLINE_ENV: "1" if case == "offline" else "0"}
    flag = ["--offline"] if case == "--offline" else []
    p = run_cli("finetune", "resnet18", "--epochs", 0, "--out", tmp_path / "o", *flag, env=env)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in p.stderr and p.stdout == ""
    needle = "Connection refused" if case == "closed-port" else "downloads are off"
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    for n in (needle, f"{base}/resnet18-f37072fd.pth", str(folder)):
        assert n in err[0], err[0]
    assert not (tmp_path / "o").exists() and (not folder.exists() or not any(folder.iterdir()))
