"""argparse's and jsonargparse's private API: tables read for one-line errors and list flags, and a parse that
leaves validation for later (emalign/commands/cli.py)."""

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


def parse_unvalidated(parser, args: list[str]) -> Any:
    """``parser.parse_args(args)`` without the final validation, so that values can be filled in first
    (jsonargparse has no public switch for it)."""
    return parser.parse_args(args, _skip_validation=True)
