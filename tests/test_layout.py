"""The package layout states the architecture, and this test holds the code to it.

Layers, lowest first: ``convert/`` (weights and graphs) knows nothing of the others; in ``models/``,
``zoo/`` and ``data/`` are independent of each other, ``train/`` builds on them, ``run/`` (run
directories) on all three; ``cli/`` on everything. Every module's imports are read with ``ast``
(nothing is imported, so no torch), the function-level ones included.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]  # "wnconvert.convert" -> "convert"

# The layer each part may import from (besides itself and the third-party world).
ALLOWED = {
    "convert": {"convert"},
    "models.zoo": {"convert", "models.zoo"},
    "models.data": {"convert", "models.data"},
    "models.train": {"convert", "models.zoo", "models.data", "models.train"},
    "models.run": {"convert", "models.zoo", "models.data", "models.train", "models.run"},
    "cli": {"convert", "models.zoo", "models.data", "models.train", "models.run", "cli"},
}


def _modules() -> dict[str, Path]:
    """Dotted name (``wnconvert.models.run.rundir``) -> file, for every module of the package."""
    found = {}
    for dotted, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([dotted, *parts])] = path
    return found


def _part(dotted: str) -> str | None:
    """The layer of a ``wnconvert.*`` name: ``convert``, ``cli``, ``models.<sub>``; None outside."""
    parts = dotted.split(".")
    if parts[0] != "wnconvert" or len(parts) < 2:
        return None
    if parts[1] == "models":
        return "models" if len(parts) == 2 else f"models.{parts[2]}"
    return parts[1]


def _imports(dotted: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute name) of every import in the module; ``from X import y`` gives X.y too,
    since y may be a submodule."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = dotted.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def violations(modules: dict[str, Path]) -> list[str]:
    bad = []
    for dotted, path in modules.items():
        here = _part(dotted)
        if here == "models":  # only models/__init__.py lives at the top of models/
            if path.name != "__init__.py":
                bad.append(f"{_shown(path)}: a module directly in models/ (put it in a layer)")
            continue
        seen = set()
        for line, name in _imports(dotted, path):
            there = _part(name)
            if there is None or there == "models" or (line, there) in seen:
                continue  # "from wnconvert.models import data" is judged by its second name
            seen.add((line, there))
            if there not in ALLOWED[here]:
                bad.append(f"{_shown(path)}:{line}: {here} imports {name} ({there})")
    return bad


def test_every_module_is_in_a_known_layer():
    modules = _modules()
    assert len(modules) > 80  # the whole tree was found
    layers = {_part(name) for name in modules}
    assert layers == set(ALLOWED) | {"models"}, layers


def test_imports_follow_the_layers():
    assert violations(_modules()) == []


@pytest.mark.parametrize("layer, source, expected", [
    ("convert/fold.py", "from wnconvert.models.run.rundir import RunDir\n", "convert imports"),
    ("convert/quantize/static.py", "def f():\n    from ...models.zoo import zoo\n", "convert imports"),
    ("models/train/train.py", "from ..run.rundir import METRICS\n", "models.train imports"),
    ("models/data/data.py", "from ..zoo.zoo import build_model\n", "models.data imports"),
    ("models/zoo/zoo.py", "from wnconvert.models.data import data\n", "models.data"),
    ("models/run/run.py", "import wnconvert.cli.main\n", "models.run imports wnconvert.cli"),
])
def test_a_wrong_way_import_is_caught(tmp_path, layer, source, expected):
    """The checker itself: each import against the direction, added to a real module, is reported."""
    modules = _modules()
    dotted = next(name for name, path in modules.items() if path == ROOT / layer)
    bad_file = tmp_path / Path(layer).name
    bad_file.write_text(source)
    modules[dotted] = bad_file
    found = violations(modules)
    assert len(found) == 1 and expected in found[0], found


def test_every_package_is_declared():
    """Each folder with an ``__init__.py`` is in pyproject's packages (a wheel would miss it otherwise)."""
    declared = set(PYPROJECT["tool"]["setuptools"]["packages"])
    packages = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert packages == declared
