"""Writing run-directory files so that a crash or a bad input never leaves a half-written one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserInputError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename. A
    writer failing inside (a full disk: OSError, or the RuntimeError torch.save and safetensors
    raise for it) becomes one UserInputError line naming ``path``."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, (UserInputError, NotImplementedError, RecursionError)):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        free = shutil.disk_usage(path.parent).free
        raise UserInputError(f"cannot write {path} ({free} bytes free there): {first}") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file, [] when it is absent; a torn last line (a crash while
    appending) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _jsonable(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed; a clear error if it cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserInputError(f"output path {path} exists and is not a directory") from None
    except OSError as e:
        raise UserInputError(f"cannot create output directory {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserInputError(f"output directory {path} is not writable")
    return path


def check_output_dir(path: Path) -> Path:
    """Fail early, without creating anything, when ``path`` cannot become a writable directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"output path {path} exists and is not a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserInputError(f"cannot create output directory {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"output directory {path} is not writable")
    return path


def read_json(path: Path, kind: str = "json") -> dict:
    """A JSON record through the guarded reader (``reading.py``: regular file, ``kind``'s size bound)."""
    from .reading import read_json as guarded

    return guarded(path, kind)
