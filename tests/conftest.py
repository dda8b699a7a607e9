import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "2")
# No test downloads anything: pretrained weights come only from a test's own hub cache. The tests
# of the download itself (test_download.py) turn this off and serve files on 127.0.0.1.
os.environ["WNCONVERT_OFFLINE"] = "1"


REAL_FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def fashion_run(tmp_path_factory):
    """A ResNet-18 at 32 px trained one epoch on 4096 real Fashion-MNIST images (73 % top-1, 15 s),
    with its model.onnx (test_openvino.py and test_targets.py copy it before exporting into it)."""
    if not os.path.isdir(REAL_FASHION):
        pytest.skip(f"{REAL_FASHION} missing (Debian package dataset-fashion-mnist)")
    from typer.testing import CliRunner

    from wnconvert.cli.main import app

    out = tmp_path_factory.mktemp("fashion_run") / "run"
    _SESSION_DIRS.add(out.parent)
    args = ["finetune", "resnet18", "--weights", "none", "--num-classes", "10", "--image-size", "32",
            "--data", "fashion-mnist", "--epochs", "1", "--limit-train", "4096", "--limit-val", "64",
            "--samples", "4", "--workers", "0", "--device", "cpu", "--out", str(out)]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def bare_run(tmp_path_factory):
    """A run directory and nothing more (ResNet-18 at 32 px, 10 classes, untrained, not exported):
    what the .tflite tests put a hand-built model.int8.tflite beside (copy it first)."""
    from typer.testing import CliRunner

    from wnconvert.cli.main import app

    out = tmp_path_factory.mktemp("bare_run") / "run"
    _SESSION_DIRS.add(out.parent)
    args = ["finetune", "resnet18", "--weights", "none", "--num-classes", "10", "--image-size", "32",
            "--epochs", "0", "--no-export", "--out", str(out)]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


# -- disk: a ResNet-18 run directory is ~250 MB; the suite makes dozens of them -------------------
# pyproject's retention policy deletes each passing test's tmp_path; the directories module-scoped
# fixtures make with tmp_path_factory go here when the module ends with no failure. Directories
# of session fixtures are kept (they register themselves in _SESSION_DIRS).
_SESSION_DIRS: set = set()
_FAILED_MODULES: set = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _FAILED_MODULES.add(item.module.__name__)
    return report


@pytest.fixture(scope="module", autouse=True)
def _free_module_dirs(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.module.__name__ in _FAILED_MODULES:
        return
    for path in set(base.iterdir()) - before - _SESSION_DIRS:
        if path.is_symlink():  # mktemp's "<name>current" link
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
