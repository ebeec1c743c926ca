"""argparse's and jsonargparse's private tables, read for one-line errors and list flags (cli.py)."""

from __future__ import annotations

from typing import Any, Optional


def actions(parser) -> list[Any]:
    """Every action of ``parser`` (argparse keeps no public list of them)."""
    return parser._actions


def subparsers(action) -> dict[str, Any]:
    """{name: parser} of a subcommands action; {} for any other action."""
    return getattr(action, "_name_parser_map", {})


def option_action(parser, option: str) -> Optional[Any]:
    """The action behind ``--option`` (None when there is none)."""
    return parser._option_string_actions.get(option)


def type_hint(action) -> Optional[Any]:
    """The type jsonargparse checks an action's value against (None for a plain argparse action)."""
    return getattr(action, "_typehint", None)
