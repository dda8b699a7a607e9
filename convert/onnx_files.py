"""Checks on an ONNX file before anything reads it: where its external data may come from.

A model larger than 2 GB keeps its tensors in files beside it (``external_data`` entries naming a
``location``). A file given by a user (``verify --onnx``, ``eval``, ``inspect``) could name any
path there: ``../../etc/passwd``, an absolute path, or a link out of its folder. wnconvert reads
external data only from regular files inside the model's own folder, and says which tensor names
what when it refuses; nothing is read or written before this check.
"""

from __future__ import annotations

import functools
from pathlib import Path

import onnx
from onnx import TensorProto

from .errors import UserInputError
from .reading import load_onnx


def _tensors(graph: onnx.GraphProto):
    """Every tensor stored in ``graph``: initializers, ``Constant``/attribute tensors, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def external_locations(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(tensor name, location)`` of every tensor whose data lives outside the model file."""
    found = []
    for t in _tensors(model.graph):
        if t.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in t.external_data}
            found.append((t.name, entries.get("location", "")))
    return found


def check_external_data(path: Path) -> None:
    """Raise :class:`UserInputError` unless every external-data location of ``path`` is a relative
    path naming an existing regular file inside ``path``'s folder (links resolved). A file that
    passed is not parsed again while its size and modification time stay the same."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserInputError(f"{path} does not exist") from None
    _check(path, path.resolve(), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _check(path: Path, resolved: Path, size: int, mtime_ns: int) -> None:
    model = load_onnx(path, external_data=False)  # regular file, bounded, parse errors in one line
    folder = resolved.parent
    for name, location in external_locations(model):
        where = f"{path}: tensor {name!r} keeps its data in {location!r}"
        if not location or Path(location).is_absolute():
            raise UserInputError(f"{where}; only a relative path inside {path.parent}/ is read")
        target = (folder / location).resolve()
        if not target.is_relative_to(folder):
            raise UserInputError(f"{where}, outside the model's folder {path.parent}/; refusing to read it")
        if not target.is_file():
            raise UserInputError(f"{where}, which is not a file in {path.parent}/")
