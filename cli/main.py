"""``wnconvert``: thin Typer commands over ``wnconvert.convert`` and ``wnconvert.models``.

Each command imports the library module it calls in its body: those load torch and onnx, which
``--help`` and a parser error must not wait for (tests/test_cli_startup.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from wnconvert.convert.errors import RangeError

from .errors import OneLineErrors, handle_errors
from .eval_cmd import eval_command
from .finetune import HELP_PANELS as FINETUNE_PANELS
from .finetune import finetune
from .golden_cmd import golden
from .help_layout import tidy_help
from .options import usage_message
from .render import JsonOpt, console, print_json, ranges_table
from .report_cmd import report
from .runs import export, fold, verify


class _Group(OneLineErrors):
    message = staticmethod(usage_message)

    def get_command(self, ctx, cmd_name):  # every command's --help reads at 80 columns (help_layout)
        return tidy_help(super().get_command(ctx, cmd_name), HELP_PANELS.get(cmd_name))


HELP_PANELS = {"finetune": FINETUNE_PANELS}

app = typer.Typer(
    cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help=(
        "Fine-tune torchvision models with every conv/linear weight in [-1, 1], fold the reparametrization, export "
        "ONNX and prove it computes what the trained model does."))

for _name, _command in (("finetune", finetune), ("fold", fold), ("export", export),
                        ("verify", verify)):
    app.command(name=_name)(_command)


@app.command()
@handle_errors
def inspect(
    path: Path = typer.Argument(..., help="An .onnx file, a state_dict (.pth/.pt/.safetensors) or a run directory."),
    require_unit_range: bool = typer.Option(False, "--require-unit-range", help=(
        "Exit 4 when any weight lies outside [-1, 1].")),
    json_out: bool = JsonOpt,
):
    """Per-layer weight ranges. For a run directory, its model.onnx."""
    from wnconvert.convert.inspect_weights import inspect_file
    from wnconvert.models.run.rundir import RunDir
    from wnconvert.models.zoo.zoo import load_state_file

    if path.is_dir():
        path = RunDir(path).onnx_path
    rows = inspect_file(path, load_state_file)
    bad = [r for r in rows if not r["in_unit_range"]]
    if json_out:
        print_json({"path": str(path), "tensors": rows, "outside_unit_range": len(bad)})
    else:
        console.print(ranges_table(rows, f"Weight ranges of {path}", limit=None))
        console.print(f"{len(rows)} weight tensors, {len(bad)} outside [-1, 1]")
    if require_unit_range and bad:
        worst = max(bad, key=lambda r: r["max_abs"])
        raise RangeError(f"{len(bad)} weight tensor(s) outside [-1, 1] in {path} "
                         f"(worst {worst['name']}: max|w|={worst['max_abs']:.6g})")


@app.command()
@handle_errors
def schemes(json_out: bool = JsonOpt):
    """List the weight-range schemes."""
    from wnconvert.convert.schemes import SCHEME_HELP
    if json_out:
        print_json(SCHEME_HELP)
        return
    t = Table(title="Schemes")
    t.add_column("scheme")
    t.add_column("normalization")
    for k, v in SCHEME_HELP.items():
        t.add_row(k, v)
    console.print(t)


@app.command()
@handle_errors
def models(json_out: bool = JsonOpt):
    """List the torchvision classification models."""
    from wnconvert.models.zoo.zoo import list_models
    names = list_models()
    if json_out:
        print_json(names)
        return
    console.print(", ".join(names))
    console.print(f"{len(names)} models")


app.command(name="report")(report)
app.command(name="eval")(eval_command)
app.command(name="golden")(golden)


def main() -> None:
    import signal

    from . import _terminate, _terminate_importing

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, _terminate_importing):  # one line and 130, not 143
        signal.signal(signal.SIGTERM, _terminate)
    app()


if __name__ == "__main__":
    main()
