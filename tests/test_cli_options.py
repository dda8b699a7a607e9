"""Choice options come from the library's registries and defaults from its dataclasses."""

import dataclasses

import pytest
import typer
from typer.testing import CliRunner

from wnconvert.cli.main import app
from wnconvert.cli.options import usage_message
from wnconvert.convert.fold import FoldConfig
from wnconvert.convert.quant_check import QuantThresholds
from wnconvert.convert.schemes import REGISTRY, SchemeConfig
from wnconvert.convert.verify import VerifyConfig
from wnconvert.models.run.run_export import PrecisionOptions
from wnconvert.models.train.optim import OPTIMIZERS
from wnconvert.models.train.train import TrainConfig

runner = CliRunner()


def _params(command: str) -> dict:
    return {p.name: p for p in typer.main.get_command(app).commands[command].params}


@pytest.mark.parametrize("command,option,cls,field", [
    ("finetune", "scheme", SchemeConfig, "scheme"), ("finetune", "gain", SchemeConfig, "gain"),
    ("finetune", "bn", FoldConfig, "bn"), ("finetune", "optimizer", TrainConfig, "optimizer"),
    ("finetune", "wd_mode", TrainConfig, "wd_mode"), ("finetune", "schedule", TrainConfig, "schedule"),
    ("finetune", "batch_size", TrainConfig, "batch_size"), ("finetune", "workers", TrainConfig, "workers"),
    ("finetune", "rtol", VerifyConfig, "rtol"), ("finetune", "samples", VerifyConfig, "samples"),
    ("verify", "min_cosine", VerifyConfig, "min_cosine"),
    ("verify", "min_sqnr", QuantThresholds, "min_sqnr_db"),
    ("export", "calib_samples", PrecisionOptions, "calib_samples"),
    ("export", "calibrate_method", PrecisionOptions, "calibrate_method"),
])
def test_cli_defaults_are_the_library_defaults(command, option, cls, field):
    default = next(f.default for f in dataclasses.fields(cls) if f.name == field)
    assert _params(command)[option].default == default


def test_the_library_default_optimizer_is_adamw():
    assert TrainConfig().optimizer == "adamw" == _params("finetune")["optimizer"].default


def test_help_lists_the_registry_choices():
    r = runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "400"})
    assert r.exit_code == 0
    assert "One of: " + ", ".join(REGISTRY) + "." in r.output  # cli/help_layout.py: whole, between values
    assert "One of: " + ", ".join(OPTIMIZERS) + "." in r.output


@pytest.mark.parametrize("args,line", [
    (["finetune", "resnet18", "--scheme", "bogus"],
     "unknown scheme 'bogus'; choose one of: layer-max, channel-max, weight-std, weight-norm, none"),
    (["finetune", "resnet18", "--optimizer", "adam"], "unknown optimizer 'adam'; choose one of: sgd, adamw, lars"),
    (["export", "run", "--act-type", "int16"], "unknown activation type 'int16'; choose one of: uint8, int8"),
    (["eval", "x.onnx", "--data", "synthetic", "--provider", "tpu"],
     "unknown provider 'tpu'; choose one of: cpu, cuda"),
    (["verify", "run", "--no-such-option"], "No such option: --no-such-option"),
])
def test_the_parser_rejects_bad_values_in_one_line(tmp_path, args, line):
    r = runner.invoke(app, args + ["--out", str(tmp_path / "o")] if args[0] == "finetune" else args)
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [f"wnconvert: error: {line}"]
    assert not (tmp_path / "o").exists()


def test_usage_message_leaves_other_errors_alone():
    assert usage_message(None, "Missing option '--data'.") == "Missing option '--data'."
    assert usage_message("wd_mode", "Value error, 'x' is not one of 'l2', 'none'.") == \
        "unknown wd mode 'x'; choose one of: l2, none"
