"""``--config FILE``: option defaults from a TOML file or an earlier run's manifest.json.

An eager option whose callback fills Click's ``default_map`` before the other options are read,
so every flag given on the command line still wins, and what the command records (the manifest)
is the resolved value whichever way it came."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from wnconvert.convert.errors import UserInputError
from wnconvert.models.run.config_file import read_defaults

# Where the run goes and whether it continues or replaces one: always said on the command line.
NEVER_FROM_CONFIG = {"out", "resume", "overwrite", "config", "json_out"}


def _load(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    if value is None or ctx.resilient_parsing:
        return value
    known = {p.name for p in ctx.command.params if p.name}
    try:
        defaults = read_defaults(value, known, NEVER_FROM_CONFIG)
    except UserInputError as err:
        raise typer.BadParameter(str(err), ctx=ctx, param=param) from None
    params = {p.name: p for p in ctx.command.params if p.name}
    for key, v in defaults.items():
        problem = _type_problem(params[key], v)
        if problem:
            raise typer.BadParameter(f"{value}: {key.replace('_', '-')} = {v!r} {problem}", ctx=ctx, param=param)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _kind(p) -> str:
    """boolean | integer | float | "" (anything else) for option ``p``."""
    ann = getattr(getattr(p, "type_descriptor", None), "annotation", None)
    if ann in (bool, int, float):
        return {bool: "boolean", int: "integer", float: "float"}[ann]
    return {"boolean": "boolean", "integer": "integer", "float": "float"}.get(
        getattr(getattr(p, "type", None), "name", ""), "")


def _type_problem(p, v) -> str:
    """Why the config value ``v`` does not fit option ``p`` where Click would silently coerce it
    (``true`` to 1 for an integer option, ``8.5`` to 8), or ""."""
    kind = _kind(p)
    if isinstance(v, bool) and kind != "boolean":
        return f"is a boolean; {p.opts[0]} takes {'an ' + kind if kind else 'a value'}"
    if kind == "integer" and isinstance(v, float):
        return f"is not an integer; {p.opts[0]} takes one"
    if kind == "boolean" and not isinstance(v, bool):
        return f"is not true or false; {p.opts[0]} is a flag"
    return ""


ConfigOpt = typer.Option(
    None, "--config", is_eager=True, callback=_load, metavar="FILE",
    help="Defaults for every option from a TOML file or a run's manifest.json; flags override.")
