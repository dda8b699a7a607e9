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
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigOpt = typer.Option(
    None, "--config", is_eager=True, callback=_load, metavar="FILE",
    help="Defaults for every option from a TOML file or a run's manifest.json; flags override.")
