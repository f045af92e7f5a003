"""Command-line verbs from typed functions: the signature gives the options, the docstring the help.

``prepare-data``, ``embed``, ``evaluate`` and ``generate`` are plain functions with type hints and
a Google-style docstring; :func:`build_parser` turns one into an argparse parser (``some_name``
becomes ``--some-name``, booleans get ``--flag / --no-flag``, a ``Literal`` its choices,
``list[int]`` or ``tuple[int, ...]`` takes several values) and :func:`run_verb` calls it and maps
the errors a user can fix (:class:`CommandError`, missing files) to a one-line message and exit
status 1, so that a traceback always means a bug. Plain argparse starts in about 2 ms, where
jsonargparse took 80-120 ms (``train`` keeps jsonargparse for its YAML configs).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import typing
from collections.abc import Callable
from typing import Any, Literal


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


def _without_none(hint: Any) -> Any:
    """X for ``X | None``; the hint itself otherwise (a Literal's None is one of its values)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal or type(None) not in args:
        return hint
    rest = [arg for arg in args if arg is not type(None)]
    return rest[0] if len(rest) == 1 else hint


def build_parser(
    function: Callable[..., Any],
    *,
    prog: str,
    positional: tuple[str, ...] = (),
    short: dict[str, str] | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A parser whose options are ``function``'s parameters (see the module docstring).

    ``positional`` names parameters given without an option name; ``short`` maps a parameter to
    a one-letter alias such as ``"-o"``.
    """
    short = short or {}
    description, helps = _docstring(function)
    hints = typing.get_type_hints(function)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, param in inspect.signature(function).parameters.items():
        hint = _without_none(hints.get(name, str))
        kwargs: dict[str, Any] = {"help": helps.get(name, "")}
        if typing.get_origin(hint) is Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif typing.get_origin(hint) in (list, tuple):  # list[X] or tuple[X, ...]
            kwargs.update(type=typing.get_args(hint)[0], nargs="+")
        elif hint is not bool:
            kwargs["type"] = hint
        if name in positional:
            parser.add_argument(name, **kwargs)
            continue
        names = [short[name], _option(name)] if name in short else [_option(name)]
        if param.default is inspect.Parameter.empty:
            kwargs["required"] = True
        else:
            default = param.default
            kwargs["default"] = list(default) if isinstance(default, tuple) else default
            if default is not None and hint is not bool:
                shown = (
                    f"{default:.3g}" if isinstance(default, float)
                    else " ".join(map(str, default)) if isinstance(default, tuple)
                    else default
                )  # fmt: skip
                kwargs["help"] += f" (default: {shown})"
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        kwargs.setdefault("metavar", None if "choices" in kwargs else name.upper())
        parser.add_argument(*names, **kwargs)
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
    file; 130 on Ctrl-C. Option errors exit with status 2 (argparse prints the usage).
    """
    parser = build_parser(function, prog=prog, positional=positional, short=short)
    kwargs = vars(parser.parse_args(argv))
    try:
        function(**kwargs)
    except (CommandError, FileNotFoundError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
