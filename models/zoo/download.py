"""Pretrained weights files in the torch hub cache, downloaded there the way torchvision does.

``fetch_weights(url)`` returns the file's path in ``torch.hub.get_dir()/checkpoints``. When it is
not there it is downloaded, unless offline: streamed to a temporary name beside it, its sha256
checked against the hex prefix in its name (torchvision's ``NAME-HASHPREFIX.pth``), then renamed,
so that a failed, refused or interrupted download leaves nothing in the cache.

Environment:

* ``WNCONVERT_OFFLINE=1`` forbids any network access (the ``offline`` argument overrides it).
* ``WNCONVERT_WEIGHTS_BASE_URL`` downloads from a mirror instead: a folder, served over
  ``http(s)://`` or ``file://``, holding the files under the names they have in the hub cache; the
  file's name is appended to it.
* ``WNCONVERT_DOWNLOAD_TIMEOUT`` seconds (default 600): the whole download, connection included,
  however slowly the server trickles its bytes; connecting and each wait for data also time out
  after ``STALL_S`` (30 s, or the whole timeout when that is shorter).

Only ``http://``, ``https://`` and ``file://`` sources are read; any other scheme is refused.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from wnconvert.convert.artifacts import atomic_path
from wnconvert.convert.errors import UserInputError

OFFLINE_ENV = "WNCONVERT_OFFLINE"
BASE_URL_ENV = "WNCONVERT_WEIGHTS_BASE_URL"
TIMEOUT_ENV = "WNCONVERT_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # the whole transfer
STALL_S = 30.0             # connecting, and each wait for data
SCHEMES = ("http", "https", "file")
CHUNK = 1 << 20
HASH_IN_NAME = re.compile(r"-([0-9a-f]+)\.")
FALSE_WORDS = ("", "0", "false", "no", "off")


def offline_from_env() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in FALSE_WORDS


def download_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserInputError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def checkpoints_dir() -> Path:
    """Where torchvision looks for pretrained weights: ``torch.hub.get_dir()/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def file_name(url: str) -> str:
    return Path(urllib.parse.urlparse(url).path).name


def source_url(url: str) -> str:
    """``url``, or the same file under ``WNCONVERT_WEIGHTS_BASE_URL`` when that is set; refused
    unless its scheme is http, https or file."""
    base = os.environ.get(BASE_URL_ENV, "").strip()
    src = url if not base else base.rstrip("/") + "/" + urllib.parse.quote(file_name(url))
    scheme = urllib.parse.urlparse(src).scheme.lower()
    if scheme not in SCHEMES:
        where = f"{BASE_URL_ENV}={base!r}" if base else src
        raise UserInputError(f"{where}: unsupported scheme {scheme or '(none)'!r}; a weights source is "
                             "an http://, https:// or file:// URL")
    return src


def expected_hash_prefix(name: str) -> str | None:
    """The sha256 prefix a file's name promises (the last ``-HEX.`` in it), or None."""
    found = HASH_IN_NAME.findall(name)
    return found[-1] if found else None


def fetch_weights(url: str, offline: bool | None = None, progress: bool | None = None) -> Path:
    """The cached file for ``url``, downloading it first when it is missing.

    ``offline``: None reads ``WNCONVERT_OFFLINE``. ``progress``: None shows a bar only when
    stderr is a terminal; nothing is ever written to stdout.
    """
    name = file_name(url)
    dest = checkpoints_dir() / name
    if dest.is_file():
        return dest
    src = source_url(url)
    if offline_from_env() if offline is None else offline:
        raise UserInputError(f"pretrained weights {name} are not in the torch hub cache and "
                             f"downloads are off ({OFFLINE_ENV}): download {src} and place it in "
                             f"{dest.parent}")
    download(src, dest, download_timeout(), progress)
    return dest


def download(src: str, dest: Path, timeout: float, progress: bool | None = None) -> None:
    """``src`` to ``dest`` atomically, its sha256 checked against the prefix in ``dest``'s name."""
    prefix = expected_hash_prefix(dest.name)
    manual = f"download it elsewhere and place {dest.name} in {dest.parent}"
    deadline = time.monotonic() + timeout
    stall = min(STALL_S, timeout)
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(src, timeout=stall) as resp, open(tmp, "wb") as out:
                total = _length(resp)
                digest, size = _copy(resp, out, total, dest.name, progress, deadline, stall)
        except ValueError as e:  # not a URL urllib can open
            raise UserInputError(f"cannot download {src}: {e}") from None
        except (OSError, http.client.HTTPException) as e:
            raise UserInputError(f"cannot download {src} ({_reason(e, stall, timeout)}): {manual}") from None
        if total is not None and size != total:
            raise UserInputError(f"download of {src} ended after {size} of {total} bytes: {manual}")
        if prefix is not None and not digest.startswith(prefix):
            raise UserInputError(f"{src} has sha256 {digest[:len(prefix)]}…, not the {prefix}… its "
                                 f"name promises: not kept")


def _length(resp) -> int | None:
    raw = resp.headers.get("Content-Length")
    return int(raw) if raw and raw.isdigit() else None


def _socket(resp):
    """The socket under an http.client response (None for file:// and others)."""
    raw = getattr(getattr(resp, "fp", None), "raw", None)
    return getattr(raw, "_sock", None)


def _copy(resp: BinaryIO, out: BinaryIO, total: int | None, label: str, progress: bool | None,
          deadline: float = float("inf"), stall: float = STALL_S) -> tuple[str, int]:
    console = Console(stderr=True)
    show = console.is_terminal if progress is None else progress
    h, size = hashlib.sha256(), 0
    with Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, disable=not show) as bar:
        task = bar.add_task("download", total=total)
        sock = _socket(resp)
        read = getattr(resp, "read1", resp.read)  # what has arrived, not a full chunk: the deadline is checked often
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("whole")
            if sock is not None:
                sock.settimeout(min(stall, left))
            try:
                chunk = read(CHUNK)
            except TimeoutError:
                if left <= stall:  # the wait was cut to the deadline: the transfer as a whole is late
                    raise TimeoutError("whole") from None
                raise
            if not chunk:
                break
            out.write(chunk)
            h.update(chunk)
            size += len(chunk)
            bar.update(task, advance=len(chunk))
    return h.hexdigest(), size


def _reason(e: BaseException, stall: float, timeout: float) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        if not isinstance(e.reason, BaseException):
            return str(e.reason)
        e = e.reason
    if isinstance(e, TimeoutError):
        if str(e) == "whole":
            return f"not complete within {timeout:g} s, {TIMEOUT_ENV}"
        return f"no answer within {stall:g} s"
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return (str(text).splitlines() or [type(e).__name__])[0][:200]
