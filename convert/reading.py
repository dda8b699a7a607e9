"""The one guarded reader for every file wnconvert reads: configs, manifests, reports, ONNX files.

A path given by a user may name anything: ``/dev/zero`` (endless), a FIFO (``open`` blocks until
a writer comes), a directory, a 200 MB "TOML" file. Every read goes through :func:`read_bytes`,
which accepts regular files only (links followed, the opened descriptor checked again), refuses a
file larger than its kind's bound *before* reading it, and never reads more than that bound (a
file growing while it is read is refused too). Parse errors become one line naming the file.

API (torch-free; ``onnx`` is imported only by :func:`load_onnx`):

* ``read_bytes(path, kind) -> bytes``
* ``read_text(path, kind) -> str`` (UTF-8), ``read_json(path, kind) -> dict``,
  ``read_toml(path, kind) -> dict``
* ``check_file(path, kind) -> int``: the same checks without reading (the file's size), for a
  file another library opens by its path
* ``load_onnx(path, kind="onnx", external_data=True, error=UserInputError) -> onnx.ModelProto``

Every function raises ``error`` (default :class:`UserInputError`, exit 2) with one line; a caller
for which a hash or a contract is at stake passes :class:`ParityError` (exit 3). ``LIMITS`` holds
each kind's bound in bytes (stated in the README).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import UserInputError

MiB = 1 << 20
LIMITS: dict[str, int] = {
    "config": 1 * MiB,          # finetune --config TOML / manifest.json
    "manifest": 16 * MiB,       # a run's manifest.json
    "report": 64 * MiB,         # a run's report.json, golden index.json
    "json": 16 * MiB,           # any other JSON record
    "onnx": 2048 * MiB,         # an ONNX file (protobuf's 2 GB limit; larger models keep external data)
    "tflite": 2048 * MiB,       # a .tflite flatbuffer
    "qonnx": 2048 * MiB,        # a QONNX file
}
WHAT = {"config": "config", "manifest": "manifest", "report": "report", "json": "JSON file",
        "onnx": "ONNX file", "tflite": "TFLite file", "qonnx": "QONNX file"}


def _bound(kind: str) -> int:
    if kind not in LIMITS:
        raise ValueError(f"unknown file kind {kind!r} (known: {', '.join(LIMITS)})")
    return LIMITS[kind]


def _size_text(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n} bytes"


def _check_stat(path: Path, st: os.stat_result, kind: str, error: type) -> int:
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path} is a directory, not a {WHAT[kind]}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path} is not a regular file (a device, FIFO or socket); refusing to read it as a {WHAT[kind]}")
    limit = _bound(kind)
    if st.st_size > limit:
        raise error(f"{path} is {_size_text(st.st_size)}, larger than the {_size_text(limit)} a "
                    f"{WHAT[kind]} may have; refusing to read it")
    return st.st_size


def check_file(path: Path | str, kind: str, error: type = UserInputError) -> int:
    """Raise ``error`` unless ``path`` is an existing regular file within ``kind``'s bound; its size."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    return _check_stat(path, st, kind, error)


def read_bytes(path: Path | str, kind: str, error: type = UserInputError) -> bytes:
    """The bytes of the regular file ``path``, at most ``LIMITS[kind]`` of them (see the module)."""
    path = Path(path)
    check_file(path, kind, error)   # before open: opening a FIFO would block
    limit = _bound(kind)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    try:
        _check_stat(path, os.fstat(fd), kind, error)   # what was opened, not what the name said before
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(limit + 1 - size, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise error(f"{path} grew beyond the {_size_text(limit)} a {WHAT[kind]} may have while it was read")
    return b"".join(chunks)


def read_text(path: Path | str, kind: str, error: type = UserInputError) -> str:
    raw = read_bytes(path, kind, error)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"cannot read {path}: not UTF-8 text (byte {e.start}), so not a {WHAT[kind]}") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def read_json(path: Path | str, kind: str = "json", error: type = UserInputError) -> Any:
    text = read_text(path, kind, error)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise error(f"cannot read {path}: not a {WHAT[kind]} (JSON: {_one_line(e)})") from None


def read_toml(path: Path | str, kind: str = "config", error: type = UserInputError) -> dict:
    import tomllib

    text = read_text(path, kind, error)
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as e:
        raise error(f"{path} is not a TOML file: {_one_line(e)}") from None


def load_onnx(path: Path | str, kind: str = "onnx", external_data: bool = True,
              error: type = UserInputError):
    """Parse ``path`` as an ONNX model (``onnx.ModelProto``). With ``external_data`` its external
    tensors are read too, from regular files inside its folder only (``onnx_files``)."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    raw = read_bytes(path, kind, error)
    try:
        model = onnx.load_model_from_string(raw)
    except (DecodeError, ValueError, RuntimeError, RecursionError) as e:
        raise error(f"{path} is not a readable {WHAT[kind]} ({type(e).__name__}: {_one_line(e)})") from None
    if external_data:
        from .onnx_files import check_external_data, external_locations

        if external_locations(model):
            try:
                check_external_data(path)
            except UserInputError as e:
                raise error(str(e)) from None
            try:
                onnx.load_external_data_for_model(model, str(path.parent))
            except (OSError, ValueError, RuntimeError) as e:
                raise error(f"cannot read the external data of {path}: {_one_line(e)}") from None
    return model
