"""The run-directory library: the manifest round trip, an old (unversioned) run directory, and
export_precision / export_run / verify_run / resume_config called directly."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import scale_first_dequantized_weight

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.export import ExportConfig
from wnconvert.convert.fold import FoldConfig
from wnconvert.convert.schemes import SchemeConfig
from wnconvert.convert.verify import VerifyConfig
from wnconvert.models.data.data import Preprocess
from wnconvert.models.run.run import RunConfig, finetune_process, resume_config
from wnconvert.models.run.run_export import PrecisionOptions, export_precision, export_run
from wnconvert.models.run.run_verify import VerifyRequest, verify_run
from wnconvert.models.run.rundir import MANIFEST_VERSION, Manifest, RunDir
from wnconvert.models.train.train import TrainConfig

OLD_MANIFEST = Path(__file__).parent / "fixtures" / "manifest_v0.json"


def _manifest(**over) -> Manifest:
    m = Manifest(
        model="resnet18", num_classes=7, preprocess=Preprocess(48, 56, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4), True),
        weights="sd.pth", data="synthetic:7", limit_train=100, limit_val=20, gpu_decode=True,
        scheme=SchemeConfig("channel-max", "learned", "detach", ("fc", "layer4.*"), True, weight_bits=4),
        fold=FoldConfig("fold", "channel"), export=ExportConfig(opset=17, dynamic_batch=False),
        verify=VerifyConfig(rtol=1e-3, samples=3, seed=5),
        train=TrainConfig(epochs=3, optimizer="lars", lr=0.2, wd_mode="eps-shifted", schedule="constant"),
        status="complete", created="2026-12-01T00:00:00+00:00", versions={"torch": "x"},
        artifacts={"model.onnx": "ab"})
    for k, v in over.items():
        setattr(m, k, v)
    return m


def test_manifest_round_trips_through_json():
    m = _manifest()
    d = json.loads(json.dumps(m.to_dict()))
    assert d["version"] == MANIFEST_VERSION
    assert d["input"]["shape"] == ["batch", 3, 48, 48] and d["output"]["shape"] == ["batch", 7]
    back = Manifest.from_dict(d)
    assert back == m
    assert back.scheme.exclude == ("fc", "layer4.*") and back.train.optimizer == "lars"
    assert Manifest.from_dict(json.loads(json.dumps(_manifest(train=None).to_dict()))).train is None


def test_old_manifest_without_version_still_reads():
    old = json.loads(OLD_MANIFEST.read_text())
    assert "version" not in old and "gpu_decode" not in old and "weight_bits" not in old["scheme"]
    m = Manifest.from_dict(old)
    assert m.version == MANIFEST_VERSION and m.model == "resnet18" and m.num_classes == 10
    assert m.gpu_decode is False and m.scheme.weight_bits is None and m.scheme.exclude == ()
    assert m.train == TrainConfig(**old["train"])  # keys added since keep their defaults
    assert m.train.schedule == "cosine" and m.train.diagnostics == 0
    assert m.input_shape == (3, 32, 32)
    new = m.to_dict()
    for key in ("model", "num_classes", "data", "preprocess", "input", "output", "fold", "export",
                "verify", "versions", "status"):
        assert new[key] == old[key], key
    assert new["train"].items() >= old["train"].items()


def test_manifest_errors_are_user_errors():
    old = json.loads(OLD_MANIFEST.read_text())
    with pytest.raises(UserInputError, match="version 99"):
        Manifest.from_dict(old | {"version": 99})
    with pytest.raises(UserInputError, match="lacks 'model'"):
        Manifest.from_dict({k: v for k, v in old.items() if k != "model"})
    with pytest.raises(UserInputError, match="unknown scheme"):
        Manifest.from_dict(old | {"scheme": {"scheme": "bogus"}})


def test_update_report_merges_and_writes_atomically(tmp_path):
    run = RunDir(tmp_path)
    assert run.report() == {}
    run.update_report({"a": 1})
    run.update_report(lambda r: r.setdefault("quantized", {}).__setitem__("int4", {"x": 2}))
    run.update_report({"b": 3})
    assert json.loads(run.report_path.read_text()) == {"a": 1, "quantized": {"int4": {"x": 2}}, "b": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary left behind


def _convert_only(out: Path, **scheme) -> Path:
    cfg = RunConfig(model="resnet18", out=out, weights="none", num_classes=10, image_size=32,
                    scheme=SchemeConfig(**scheme), verify=VerifyConfig(samples=4))
    finetune_process(cfg)
    return out


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A run directory whose manifest.json is in the layout written before manifests had a version."""
    out = _convert_only(tmp_path_factory.mktemp("old") / "run", scheme="layer-max")
    (out / "manifest.json").write_text(OLD_MANIFEST.read_text())
    return out


def test_old_run_loads_resumes_exports_and_verifies(old_run):
    manifest, model, pre = RunDir(old_run).load()
    assert pre.image_size == 32 and manifest.scheme.scheme == "layer-max"
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)

    cfg = resume_config(old_run)
    assert cfg.out == old_run and cfg.weights == "none" and cfg.image_size == 32
    assert cfg.train == TrainConfig(**json.loads(OLD_MANIFEST.read_text())["train"])
    assert (cfg.limit_train, cfg.limit_val, cfg.data, cfg.gpu_decode) == (64, 32, "synthetic:10", False)

    before = RunDir(old_run).report()
    result = export_run(old_run, rtol=1e-3)
    assert result.parity.passed
    report = RunDir(old_run).report()
    assert report["apply"] == before["apply"]  # merged into, not replaced
    assert report["parity"]["thresholds"]["rtol"] == 1e-3
    written = json.loads((old_run / "manifest.json").read_text())
    assert written["version"] == MANIFEST_VERSION and written["verify"]["rtol"] == 1e-3
    assert written["status"] == "complete" and "model.onnx" in written["artifacts"]

    entry = export_precision(old_run, "fp16")
    assert entry["file"] == "model.fp16.onnx" and entry["vs_fp32"]["top1_agreement"] == 1.0
    out = verify_run(old_run, VerifyRequest(limit=8))
    assert out.passed and out.checked_fp32 and out.checked_quantized, out.failures
    assert out.result["quantized"]["fp16"]["inputs"] == "8 images from synthetic:10"  # the run's data
    report = RunDir(old_run).report()
    assert report["verify"] == json.loads(json.dumps(out.result))
    assert report["quantized"]["fp16"] == json.loads(json.dumps(entry))


def test_old_run_without_training_is_not_resumable(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old = json.loads(OLD_MANIFEST.read_text()) | {"train": None}
    (run / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(UserInputError, match="not a training run"):
        resume_config(run)


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    return _convert_only(tmp_path_factory.mktemp("grid") / "run", scheme="channel-max", weight_bits=4)


def test_export_precision_weights_on_the_grid_are_lossless(grid_run):
    entry = export_precision(grid_run, "int4")
    assert entry["lossless_check"] == {"rtol": 1e-4, "passed": True}
    assert entry["lossy_weights"] == 0 and entry["exact_weights"] > 10
    assert entry["inputs"] == "4 generated samples" and entry["calibration"] is None
    assert RunDir(grid_run).report()["quantized"]["int4"] == json.loads(json.dumps(entry))
    out = verify_run(grid_run, VerifyRequest(precision="int4"))
    assert out.passed and not out.checked_fp32
    assert out.result["quantized"]["int4"]["contract"] == "lossless"


def test_verify_run_catches_a_wrong_scale(grid_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(grid_run, run)
    if not (run / "model.int4.onnx").exists():
        export_precision(run, "int4")
    scale_first_dequantized_weight(run / "model.int4.onnx", 1.25)
    # recorded as if export had written it so: the contract check, not the sha256, must catch it
    RunDir(run).record(RunDir(run).manifest(), "model.int4.onnx")
    out = verify_run(run, VerifyRequest(precision="int4"))
    assert not out.passed and out.failures and out.failures[0].startswith("int4: onnx-ort")
    assert RunDir(run).report()["verify"]["passed"] is False


def test_export_precision_needs_calibration_data_for_activations(grid_run):
    with pytest.raises(UserInputError, match="calibration"):
        export_precision(grid_run, "int8")
    with pytest.raises(UserInputError, match="act-bits"):
        export_precision(grid_run, "int4", PrecisionOptions(act_bits="4"))


def test_old_training_run_resumes(tmp_path):
    """A training run whose manifest predates versions continues from train/last.pt: the
    settings come back from the old manifest, its checkpoint matches them, and the run finishes
    (folded, exported, verified) with a current manifest."""
    old = json.loads(OLD_MANIFEST.read_text())
    out = tmp_path / "run"
    first = RunConfig(model="resnet18", out=out, weights="none", num_classes=10, data=old["data"],
                      image_size=32, limit_train=old["limit_train"], limit_val=old["limit_val"],
                      train=TrainConfig(**old["train"]), no_export=True)
    finetune_process(first)
    (out / "manifest.json").write_text(OLD_MANIFEST.read_text())
    last = (out / "train" / "last.pt").read_bytes()

    summary = finetune_process(resume_config(out), resume=True)
    assert summary.conversion is not None and summary.conversion.parity.passed
    assert (out / "train" / "last.pt").read_bytes() == last  # both epochs were done: nothing retrained
    assert summary.report["training"]["best_epoch"] >= 1
    written = json.loads((out / "manifest.json").read_text())
    assert written["version"] == MANIFEST_VERSION and written["train"]["optimizer"] == "sgd"
    assert verify_run(out).passed


def test_an_act_run_from_before_the_scales_group_keeps_its_optimizer():
    """An --act-bits manifest without train.scale_lr trained its scales with the weights'
    optimizer: it loads with scale_lr None (no scales group), so it resumes and repeats as it
    trained; a float run, or an act run that records scale_lr, keeps what it says."""
    old = json.loads(OLD_MANIFEST.read_text())
    act = {"bits": 8, "range": "learned", "freeze_bn_epochs": None, "scale_format": "float",
           "mixed_precision": False, "residual_conv": "quantized"}
    scheme = old["scheme"] | {"scheme": "channel-max", "weight_bits": 8}
    assert Manifest.from_dict(old | {"scheme": scheme, "act": act}).train.scale_lr is None
    assert Manifest.from_dict(old).train.scale_lr == TrainConfig().scale_lr
    recorded = old | {"scheme": scheme, "act": act, "train": old["train"] | {"scale_lr": 0.01}}
    assert Manifest.from_dict(recorded).train.scale_lr == 0.01
