"""The package layout states the architecture, and this test holds the code to it.

Layers, lowest first: ``convert/`` (weights and graphs) knows nothing of the others; the package
root ``wnconvert/`` (the public API) builds on ``convert/`` alone; in ``models/``,
``zoo/`` and ``data/`` are independent of each other, ``train/`` builds on them, ``run/`` (run
directories) on all three; ``cli/`` on everything. ``models/files.py`` (the run directory's file
names, which the training loop and the run layer both write) sits below all of ``models/``. Every module's imports
are read with ``ast``
(nothing is imported, so no torch), the function-level ones included.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]  # "wnconvert.convert" -> "convert"

# The layer each part may import from (besides itself and the third-party world).
ALLOWED = {
    "convert": {"convert"},
    "models.files": {"convert"},
    "models.zoo": {"convert", "models.files", "models.zoo"},
    "models.data": {"convert", "models.files", "models.data"},
    "models.train": {"convert", "models.files", "models.zoo", "models.data", "models.train"},
    "models.run": {"convert", "models.files", "models.zoo", "models.data", "models.train", "models.run"},
    "cli": {"convert", "models.files", "models.zoo", "models.data", "models.train", "models.run", "cli", "root"},
    # the package root (wnconvert/: the public API for a user's own network and loop) sits on convert/ alone
    "root": {"convert", "root"},
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
    """The layer of a ``wnconvert.*`` name: ``convert``, ``cli``, ``models.<sub>``, ``root`` (the
    package root's own modules, wnconvert/); None outside."""
    parts = dotted.split(".")
    if parts[0] != "wnconvert":
        return None
    if len(parts) == 1 or parts[1] not in ("convert", "cli", "models"):
        return "root"
    if parts[1] == "models":  # models/__init__.py is "models"; models/files.py "models.files"
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
    ("models/files.py", "from .train.checkpoint import save_atomic\n", "models.files imports"),
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


def _strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the string literals of a module that are not docstrings; an f-string's
    fields read as ``{}``."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    out, in_fstrings = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = [v.value if isinstance(v, ast.Constant) else "{}" for v in node.values]
            out.append((node.lineno, "".join(map(str, parts))))
            in_fstrings |= {id(v) for v in node.values}
    out += [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings | in_fstrings]
    return out


def _run_file_names() -> tuple[str, ...]:
    from wnconvert.models import files
    return (files.MANIFEST, files.REPORT, files.CHECKPOINT, files.ONNX, files.METRICS, files.DYNAMICS,
            files.INITIAL, files.LAST, files.BEST, files.artifact_name("int8"))


def spelled_run_files(paths) -> list[str]:
    names = _run_file_names()
    return [f"{_shown(path)}:{line}: {text!r}" for path in paths for line, text in _strings(path)
            if text in names or re.fullmatch(r"model\.(\{\}|\w+)\.onnx", text)]


def test_run_file_names_live_in_one_module():
    """models/files.py names every file of a run directory: no other module spells one as a value
    (messages and docstrings may mention them; code uses the constants)."""
    paths = [p for p in sorted((ROOT / "convert").rglob("*.py")) + sorted((ROOT / "models").rglob("*.py"))
             if p != ROOT / "models" / "files.py"]
    assert spelled_run_files(paths) == []


def test_a_spelled_run_file_is_caught(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""model.int8.onnx in a docstring is fine."""\n'
                   'def f(run, p):\n    print("no model.onnx: export first")\n'
                   '    return run / f"model.{p}.onnx", run / "train" / "last.pt"\n')
    assert [line.split(": ", 1)[1] for line in spelled_run_files([bad])] == ["'model.{}.onnx'", "'last.pt'"]


def test_every_package_is_declared():
    """Each folder with an ``__init__.py`` is in pyproject's packages (a wheel would miss it otherwise)."""
    declared = set(PYPROJECT["tool"]["setuptools"]["packages"])
    packages = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert packages == declared
