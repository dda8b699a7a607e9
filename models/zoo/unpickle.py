"""``torch.load`` of a weights file with only tensors and plain containers allowed, failing in one
line that names the call a refused file makes.

torch's restricted unpickler (``weights_only=True``) refuses any other global, so nothing in the
file runs; its message is many lines and, for some files, never names the global (a plain pickle
of protocol 4 fails on an opcode first, after a warning on stderr). Here the warning is silenced
and the name is read from the pickle's opcodes (``pickletools.genops`` lists them without
executing anything), torch's message serving only when they cannot be listed: it writes
``builtins.eval`` as ``eval`` and ``subprocess.check_call`` as ``commands.check_call``.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import _weights_only_unpickler

from wnconvert.convert.errors import UserInputError

STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
              "BINSTRING", "STRING"}
GET_OPS = {"BINGET", "LONG_BINGET", "GET"}
PUT_OPS = {"BINPUT", "LONG_BINPUT", "PUT"}
BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation",
               "In PyTorch 2.6", "Re-running `torch.load`")


def load_restricted(path: Path):
    """``torch.load(path, weights_only=True)`` on the CPU, with no warning printed; a refused
    pickle is a :class:`UserInputError` naming the call it makes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserInputError(refusal(path, str(e))) from None


def refusal(path: Path, message: str) -> str:
    call = first_foreign_global(path) or _named_global(message)
    if call:
        return f"refusing to unpickle {path}: it calls {call} (only tensors and plain containers are allowed)"
    reason = next((line.strip() for line in message.splitlines()
                   if line.strip() and not any(b in line for b in BOILERPLATE)), "not a weights file")
    return f"refusing to unpickle {path}: {reason[:200]}"


def _named_global(message: str) -> str | None:
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m else None


def first_foreign_global(path: Path) -> str | None:
    """The first global the file's pickle refers to that torch's restricted unpickler does not
    allow, read from its opcodes, one outside torch first (a plain pickle of a tensor refers to
    torch's own ``_load_from_bytes``); None when there is none or the file cannot be read so."""
    try:
        allowed = set(_weights_only_unpickler._get_allowed_globals())
        foreign = [g for g in _file_globals(path) if g not in allowed]
    except Exception:  # not a pickle we can list: the caller falls back to torch's reason
        return None
    return next((g for g in foreign if g.split(".")[0] != "torch"), foreign[0] if foreign else None)


def _file_globals(path: Path) -> list[str]:
    """Globals of a zip-format torch file's ``data.pkl``, or of the pickles a legacy torch file
    or a plain pickle starts with (a legacy file is several pickles, then raw tensor bytes)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return pickle_globals(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
    data = Path(path).read_bytes()
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data) and data[stream.tell()] == 0x80:  # a PROTO opcode: a pickle
        start = stream.tell()
        try:
            for _ in pickletools.genops(stream):  # reads up to this pickle's STOP
                pass
        except Exception:
            break
        found += pickle_globals(data[start:stream.tell()])
    return found


def pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in the first pickle of ``data``, in order."""
    found: list[tuple[str, str]] = []
    memo: dict[int, str | None] = {}
    pushed: list[str | None] = []
    proto = 0
    for op, arg, _ in pickletools.genops(data):
        if op.name == "PROTO":
            proto = arg
        elif op.name in STRING_OPS:
            pushed.append(arg if isinstance(arg, str) else None)
        elif op.name in GET_OPS:
            pushed.append(memo.get(arg))
        elif op.name in PUT_OPS or op.name == "MEMOIZE":
            memo[arg if op.name != "MEMOIZE" else len(memo)] = pushed[-1] if pushed else None
        elif op.name == "GLOBAL":
            found.append(tuple(str(arg).split(" ", 1)))
        elif op.name == "STACK_GLOBAL" and len(pushed) >= 2:
            found.append((str(pushed[-2]), str(pushed[-1])))
        if op.name not in STRING_OPS | GET_OPS | PUT_OPS | {"MEMOIZE"}:
            pushed.append(None)
    return [".".join(_python3_name(m, n) if proto < 3 else (m, n)) for m, n in found]


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """The name an unpickler resolves a protocol 0-2 global to (``__builtin__.eval`` is
    ``builtins.eval``), as ``pickle.Unpickler(fix_imports=True)`` does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name
