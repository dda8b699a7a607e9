"""``--help`` in an 80-column terminal: no word of it is broken or cut (a choice list used to
read ``<layer-max|chann el-max|...>``), every choice list is whole, and every finetune option sits
in a named panel. The help at 80 columns must hold exactly the words it holds at 400."""

import re
from collections import Counter

import pytest
import typer
import typer.rich_utils
from typer.testing import CliRunner

from wnconvert.cli.finetune import HELP_PANELS
from wnconvert.cli.help_layout import choice_values
from wnconvert.cli.main import app

COMMANDS = sorted(typer.main.get_command(app).commands)
BOX = re.compile(r"[│╭╮╰╯─┌┐└┘├┤┬┴┼]")


def render(argv: list[str], columns: int) -> str:
    """``wnconvert ARGV`` as a terminal of ``columns`` columns shows it (Typer's console width)."""
    before = typer.rich_utils.MAX_WIDTH
    typer.rich_utils.MAX_WIDTH = columns
    try:
        r = CliRunner().invoke(app, argv)
    finally:
        typer.rich_utils.MAX_WIDTH = before
    assert r.exit_code == 0, r.output
    return r.output


def words(text: str) -> Counter:
    return Counter(BOX.sub(" ", text).split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_breaks_no_word(command):
    narrow, wide = render([command, "--help"], 80), render([command, "--help"], 400)
    assert max(len(line) for line in narrow.splitlines()) <= 80 < max(len(line) for line in wide.splitlines())
    broken = words(narrow) - words(wide)   # fragments of a folded word, or a word cut with "…"
    assert not broken, f"{command} --help at 80 columns breaks: {sorted(broken)[:8]}"
    cmd = typer.main.get_command(app).get_command(None, command)
    flat = " ".join(BOX.sub(" ", narrow).split())  # an option's help lines follow each other
    for p in cmd.params:
        values = choice_values(p)
        if values:  # the whole list, in the option's help text, wrapped between values only
            assert "One of: " + ", ".join(values) + "." in flat, (command, p.name)


def test_finetune_options_are_grouped_in_panels():
    cmd = typer.main.get_command(app).get_command(None, "finetune")
    named = [n for names in HELP_PANELS.values() for n in names]
    assert len(named) == len(set(named))
    options = {p.name for p in cmd.params if p.param_type_name == "option"}
    assert options == set(named)
    text = render(["finetune", "--help"], 80)
    positions = [text.index(f"─ {title} ") for title in HELP_PANELS]
    assert positions == sorted(positions)
