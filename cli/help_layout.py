"""``--help`` that reads in an 80-column terminal.

Typer shows a choice option's values as its type (``<layer-max|channel-max|...>``), one word with
no space, which rich folds mid-word in a narrow column. :func:`tidy_help` moves every choice list
into the option's help text (``One of: layer-max, channel-max, ...``), where it wraps between
values, and shows ``<choice>`` as the type; it also puts each option into the help panel its
command names (``HELP_PANELS`` of cli/finetune.py). Applied once per command, when the group
hands it out (cli/main.py); nothing here loads torch."""

from __future__ import annotations

CHOICE_METAVAR = "<choice>"


def choice_values(param) -> list[str] | None:
    """The values of a choice option (None for any other parameter)."""
    desc = getattr(param, "type_descriptor", None)
    if desc is None or not desc.is_choice:
        return None
    return [str(getattr(c, "value", c)) for c in desc.choices or ()]


def tidy_help(command, panels: dict[str, tuple[str, ...]] | None = None):
    """Move choice lists into the help text and assign options to ``panels`` (title -> parameter
    names, in display order); idempotent. Returns ``command``."""
    if command is None or getattr(command, "_wn_tidy", False):
        return command
    panel_of = {name: title for title, names in (panels or {}).items() for name in names}
    for p in command.params:
        values = choice_values(p)
        if values and p.metavar is None:
            p.metavar = CHOICE_METAVAR
            text = (p.help or "").rstrip()
            if text and not text.endswith((".", ")", ":")):
                text += "."
            p.help = (text + " One of: " + ", ".join(values) + ".").lstrip()
        if p.name in panel_of:
            p.rich_help_panel = panel_of[p.name]
    if panels:  # options are listed panel by panel, in the order the panels are given
        order = {name: i for i, name in enumerate(n for names in panels.values() for n in names)}
        command.params.sort(key=lambda p: order.get(p.name, len(order)))
    command._wn_tidy = True
    return command
