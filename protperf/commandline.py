"""Command-line verbs from typed functions: the signature gives the options, the docstring the help.

``embed``, ``evaluate`` and ``generate`` are plain functions with type hints and a Google-style
docstring; :func:`run_verb` turns one into a jsonargparse parser (``some_name`` becomes
``--some-name``, booleans get ``--flag / --no-flag``, ``list[int]`` or ``tuple[int, ...]`` takes several
values), calls it
and maps the errors a user can fix (:class:`CommandError`, missing files) to a one-line message
and exit status 1, so that a traceback always means a bug.
"""

from __future__ import annotations

import inspect
import sys
import typing
from collections.abc import Callable
from typing import Any

from jsonargparse import ActionYesNo, ArgumentParser


class CommandError(Exception):
    """An error in the user's input (file, option, model) with a message that says how to fix it."""


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _docstring(function: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(description, {parameter: help}) from a Google-style docstring."""
    import docstring_parser

    parsed = docstring_parser.parse(inspect.getdoc(function) or "")
    description = "\n\n".join(
        part for part in (parsed.short_description, parsed.long_description) if part
    )
    return description, {param.arg_name: param.description or "" for param in parsed.params}


def _sequence_item(hint: Any) -> Any:
    """X for list[X], tuple[X, ...] and their ``| None``; None for anything else."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) in (list, tuple):
        return args[0]
    if len(args) == 1 and typing.get_origin(args[0]) in (list, tuple):
        return typing.get_args(args[0])[0]
    return None


def build_parser(
    function: Callable[..., Any],
    *,
    prog: str,
    positional: tuple[str, ...] = (),
    short: dict[str, str] | None = None,
) -> ArgumentParser:
    """A parser whose options are ``function``'s parameters (see the module docstring).

    ``positional`` names parameters given without an option name; ``short`` maps a parameter to
    a one-letter alias such as ``"-o"``.
    """
    short = short or {}
    description, helps = _docstring(function)
    hints = typing.get_type_hints(function)
    parser = ArgumentParser(
        prog=prog, description=description, exit_on_error=True, allow_abbrev=False
    )
    for name, param in inspect.signature(function).parameters.items():
        hint = hints.get(name, str)
        kwargs: dict[str, Any] = {"help": helps.get(name, "")}
        if name in positional:
            parser.add_argument(name, type=hint, **kwargs)
            continue
        names = [short[name], _option(name)] if name in short else [_option(name)]
        if param.default is inspect.Parameter.empty:
            kwargs["required"] = True
        else:
            kwargs["default"] = param.default
        if hint is bool:
            parser.add_argument(*names, action=ActionYesNo(no_prefix="no-"), **kwargs)
        elif _sequence_item(hint) is not None:  # list[X] or tuple[X, ...], maybe | None
            item = _sequence_item(hint)
            if "default" in kwargs and kwargs["default"] is not None:
                kwargs["default"] = list(kwargs["default"])
            parser.add_argument(*names, type=item, nargs="+", **kwargs)
        else:
            parser.add_argument(*names, type=hint, **kwargs)
    return parser


def run_verb(
    function: Callable[..., Any],
    argv: list[str],
    *,
    prog: str,
    positional: tuple[str, ...] = (),
    short: dict[str, str] | None = None,
) -> int:
    """Parse ``argv`` for ``function``, call it, return the exit status.

    0 on success; 1 with ``prog: error: ...`` on stderr for a :class:`CommandError` or a missing
    file; 130 on Ctrl-C. Option errors exit with status 2 (jsonargparse prints the usage).
    """
    parser = build_parser(function, prog=prog, positional=positional, short=short)
    cfg = parser.parse_args(argv)
    kwargs = {name: cfg[name] for name in inspect.signature(function).parameters}
    try:
        function(**kwargs)
    except (CommandError, FileNotFoundError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
