import os
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
    """A ResNet-18 at 32 px trained one epoch on 128 real Fashion-MNIST images, with its model.onnx
    (test_openvino.py and test_targets.py copy it before exporting into it)."""
    if not os.path.isdir(REAL_FASHION):
        pytest.skip(f"{REAL_FASHION} missing (Debian package dataset-fashion-mnist)")
    from typer.testing import CliRunner

    from wnconvert.cli.main import app

    out = tmp_path_factory.mktemp("fashion_run") / "run"
    args = ["finetune", "resnet18", "--weights", "none", "--num-classes", "10", "--image-size", "32",
            "--data", "fashion-mnist", "--epochs", "1", "--limit-train", "128", "--limit-val", "64",
            "--batch-size", "32", "--samples", "4", "--workers", "0", "--device", "cpu", "--out", str(out)]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out
