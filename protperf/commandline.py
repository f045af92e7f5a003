"""Command-line verbs from typed functions: the signature gives the options, the docstring the help.

Every ``protperf`` verb is a plain function with type hints and a Google-style docstring, and
:class:`Verb` is the one mechanism that turns such a function into a command:

* a parameter ``some_name`` becomes ``--some-name`` (``--some_name`` is accepted too); a boolean
  gets ``--flag / --no-flag``, a ``Literal`` its choices, ``list[X]`` or ``tuple[X, ...]``
  several values (or one YAML list: ``--source '[a.fasta, b.fasta]'``);
* a parameter typed with a dataclass becomes dotted options, one per field, with the field's
  docstring as help: ``model: PerformerConfig`` gives ``--model.dim``, ``--model.depth``, ...;
* a ``dict`` parameter annotated with :class:`Keywords` takes the keyword arguments of a
  callable as dotted options, each value read as YAML (``--trainer.max_steps 1000``);
* a parameter named ``config`` makes the verb read YAML files (``--config FILE``, several
  allowed, later ones win) whose keys are the same parameters, nested for the groups, and adds
  ``--print-config``, which prints the resolved settings as YAML;
* ``Verb(..., threads=True)`` adds ``--threads N`` to a verb that computes: the process's
  intra-op threads, set before the function runs.

Dotted options keep the spelling of their YAML keys (``--trainer.max_steps``); the hyphenated
form is accepted too. Settings resolve in this order, later winning: the function's defaults, a
verb's preset (``train --concat``), the YAML files in order, the command line.

A mistyped option or a missing argument is one line on stderr with a pointer to ``--help``
(exit status 2). An :class:`~protperf.errors.InputError` or an ``OSError`` (a missing file,
permissions, a full disk, however a library words it) raised while the verb runs is one line too
(exit status 1), so that a traceback always means a bug in protperf. Only argparse and the standard library are imported
here: a verb starts as fast as its own imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import importlib
import inspect
import operator
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

from protperf.errors import InputError, ProtperfError

#: Exit statuses: a mistyped command line, and bad input met while the verb runs.
USAGE_ERROR, INPUT_ERROR, INTERRUPTED = 2, 1, 130
#: The parameter that names YAML files of settings.
CONFIG = "config"
#: Options of the process rather than of the verb's function (see :class:`Verb`).
_PROCESS_OPTIONS = ("print_config", "threads")
THREADS_HELP = (
    "intra-op threads of this process (of each, with several processes) (default: PyTorch's: "
    "OMP_NUM_THREADS when set, else one per core; several processes on one machine share its "
    "cores)"
)


@dataclass(frozen=True, eq=False)
class Fields:
    """``Annotated[SomeDataclass, Fields(skip={...})]``: leave fields out of the options."""

    skip: frozenset[str] = frozenset()


@dataclass(frozen=True, eq=False)
class Keywords:
    """``Annotated[dict[str, Any] | None, Keywords("package.Callable")]``: a dict parameter whose
    keys are the keyword arguments of a callable (imported when the parser is built), each given
    on the command line as YAML (``--trainer.devices 4``, ``--trainer.precision bf16-mixed``).

    ``skip`` leaves keywords out; ``defaults`` are this verb's values where they differ from the
    callable's own.
    """

    target: str
    skip: frozenset[str] = frozenset()
    defaults: Mapping[str, Any] = field(default_factory=dict)


class UsageError(Exception):
    """A command line that does not parse: unknown option, missing argument, invalid value."""


# ---------------------------------------------------------------------------------------------
# The options of a function
# ---------------------------------------------------------------------------------------------


@dataclass
class _Option:
    """One setting: ``path`` is ("name",) at the top level or ("group", "field") in a group."""

    path: tuple[str, ...]
    hint: Any
    default: Any
    help: str
    yaml_value: bool = False  # a Keywords entry: the command line's text is read as YAML

    @property
    def flag(self) -> str:
        if len(self.path) == 1:
            return "--" + self.path[0].replace("_", "-")
        return "--" + ".".join(self.path)

    @property
    def dest(self) -> str:
        return ".".join(self.path)


@dataclass
class _Group:
    """Dotted options of one parameter: a dataclass's fields or a callable's keywords."""

    name: str
    described_by: Any  # the dataclass, or the callable whose keywords these are
    options: dict[str, _Option]
    dataclass: type | None  # None: a Keywords dict
    description: str = ""
    #: Values before any file or option: every field of a dataclass; for a Keywords dict only
    #: the verb's own defaults (the callable applies its defaults to the rest).
    defaults: dict[str, Any] = field(default_factory=dict)


def _without_none(hint: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None``; (hint, False) otherwise (a Literal's None is one of its values)."""
    if typing.get_origin(hint) is Literal:
        return hint, False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        return (rest[0] if len(rest) == 1 else functools.reduce(operator.or_, rest)), True
    return hint, False


def _metadata(hint: Any) -> tuple[Any, Fields | Keywords | None]:
    """Strip ``Annotated``: (the type, its Fields / Keywords marker or None)."""
    if typing.get_origin(hint) is Annotated:
        base, *extras = typing.get_args(hint)
        marker = next((x for x in extras if isinstance(x, Fields | Keywords)), None)
        return base, marker
    return hint, None


def _doc(obj: Any) -> tuple[str, dict[str, str]]:
    """(description, {parameter or attribute: help}) of a Google-style docstring."""
    import docstring_parser

    parsed = (
        docstring_parser.parse_from_object(obj)
        if isinstance(obj, type)
        else docstring_parser.parse(inspect.getdoc(obj) or "")
    )
    description = "\n\n".join(
        part for part in (parsed.short_description, parsed.long_description) if part
    )
    helps = {param.arg_name: _plain_text(param.description or "") for param in parsed.params}
    return _plain_text(description), helps


def _plain_text(text: str) -> str:
    """Docstring markup as plain text: ``:class:`~x.Y``` -> ``Y``, double backquotes dropped."""
    text = re.sub(r":\w+:`~?(?:[\w.]*\.)?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def _dataclass_group(name: str, cls: type, skip: frozenset[str]) -> _Group:
    hints = typing.get_type_hints(cls)
    options = {}
    for spec in dataclasses.fields(cls):
        if spec.name in skip or not spec.init:
            continue
        if spec.default is not dataclasses.MISSING:
            default = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        else:
            raise TypeError(f"{cls.__name__}.{spec.name} needs a default to be an option")
        options[spec.name] = _Option((name, spec.name), hints[spec.name], default, "")
    defaults = {key: option.default for key, option in options.items()}
    return _Group(name, cls, options, cls, defaults=defaults)


def _keywords_group(name: str, marker: Keywords) -> _Group:
    module, _, attribute = marker.target.rpartition(".")
    target = getattr(importlib.import_module(module), attribute)
    function = target.__init__ if isinstance(target, type) else target
    options = {}
    for key, param in inspect.signature(function).parameters.items():
        if key in ("self", *marker.skip) or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = marker.defaults.get(key, param.default)
        options[key] = _Option((name, key), Any, default, "", yaml_value=True)
    unknown = set(marker.defaults) - set(options)
    if unknown:
        raise TypeError(f"defaults for keywords {marker.target} does not take: {sorted(unknown)}")
    described = f"keyword arguments of {marker.target}, values read as YAML"
    return _Group(name, function, options, None, described, dict(marker.defaults))


# ---------------------------------------------------------------------------------------------
# Values: command-line text and YAML values converted to the annotated types
# ---------------------------------------------------------------------------------------------


class _BadValue(Exception):
    pass


def _read_yaml_text(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def convert(value: Any, hint: Any) -> Any:
    """``value`` (command-line text or a YAML value) as the type ``hint``; raises ``_BadValue``."""
    hint, optional = _without_none(_metadata(hint)[0])
    if value is None or (
        optional and isinstance(value, str) and value.strip().lower() in ("null", "none")
    ):
        if optional or hint is Any:
            return None
        raise _BadValue("a value is needed")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return _read_yaml_text(value) if isinstance(value, str) else value
    if origin is Literal:
        for choice in args:
            if value == choice or (
                isinstance(value, str | int | float) and str(choice) == str(value)
            ):
                return choice
        raise _BadValue(f"{value!r} is not one of {', '.join(map(str, args))}")
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return convert(value, arg)
            except _BadValue:
                continue
        raise _BadValue(f"{value!r} is not a valid value")
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise _BadValue(f"{value!r} is not true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise _BadValue(f"{value!r} is not an integer") from None
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value))
        except ValueError:
            raise _BadValue(f"{value!r} is not a number") from None
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise _BadValue(f"{value!r} is not text")
    if isinstance(hint, type) and issubclass(hint, PurePath):
        if isinstance(value, str | PurePath):
            return hint(value)
        raise _BadValue(f"{value!r} is not a path")
    if origin in (list, tuple):
        if (
            isinstance(value, list)
            and len(value) == 1
            and isinstance(value[0], str)
            and value[0].lstrip().startswith("[")
        ):
            value = value[0]  # one YAML (or JSON) list: --source '["a.fasta", "b.fasta"]'
        if isinstance(value, str):
            text, value = value, _read_yaml_text(value)
            if text.lstrip().startswith("[") and not isinstance(value, list):
                raise _BadValue(f"{text!r} is not a YAML or JSON list")
        if not isinstance(value, list | tuple):
            value = [value]
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _BadValue(f"{len(args)} values needed, got {len(value)}")
            return tuple(convert(item, arg) for item, arg in zip(value, args, strict=True))
        item_hint = args[0] if args else Any
        items = [convert(item, item_hint) for item in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise _BadValue(f"{value!r} is not a mapping")
    return value


# ---------------------------------------------------------------------------------------------
# The verb
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing the whole usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


def canonical_spelling(argv: list[str]) -> list[str]:
    """``--some_name`` -> ``--some-name`` and ``--group.some-field`` -> ``--group.some_field``
    (the spelling of the YAML key); values and everything after ``--`` are left alone."""
    out = []
    for index, arg in enumerate(argv):
        if arg == "--":
            return out + argv[index:]
        if arg.startswith("--"):
            name, equals, value = arg[2:].partition("=")
            if "." in name:
                group, _, key = name.partition(".")
                name = f"{group.replace('_', '-')}.{key.replace('-', '_')}"
            else:
                name = name.replace("_", "-")
            arg = f"--{name}{equals}{value}"
        out.append(arg)
    return out


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``update`` applied, one level into nested dicts (the groups)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


class Verb:
    """A typed function as a command (see the module docstring).

    Args:
        function: the verb; its docstring's first paragraphs are the description, its ``Args:``
            the options' help.
        prog: the command's name in messages (``protperf embed``).
        positional: parameters given without an option name, in order.
        short: one-letter aliases, e.g. ``{"out": "-o"}``.
        preset: settings -> default overrides (nested like the settings) that apply before the
            YAML files and the command line, e.g. a mode's own defaults.
        epilog: text after the options in ``--help``.
        threads: add ``--threads N``, the intra-op threads of the process, set before the
            function runs (:func:`protperf.runtime.set_threads`); for verbs that compute. It
            is a setting of the process, not of the work: YAML files and --print-config leave
            it out.
    """

    def __init__(
        self,
        function: Callable[..., Any],
        *,
        prog: str,
        positional: tuple[str, ...] = (),
        short: Mapping[str, str] | None = None,
        preset: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
        epilog: str | None = None,
        threads: bool = False,
    ) -> None:
        self.function, self.prog, self.positional = function, prog, positional
        self.short, self.preset, self.epilog = dict(short or {}), preset, epilog
        self.threads = threads
        self.description, self._described = "", False  # filled by _describe for --help
        hints = typing.get_type_hints(function, include_extras=True)
        self.options: dict[str, _Option] = {}
        self.groups: dict[str, _Group] = {}
        self.required: list[str] = []
        for name, param in inspect.signature(function).parameters.items():
            base, marker = _metadata(hints.get(name, str))
            plain, _ = _without_none(base)
            if isinstance(marker, Keywords):
                self.groups[name] = _keywords_group(name, marker)
            elif dataclasses.is_dataclass(plain):
                skip = marker.skip if isinstance(marker, Fields) else frozenset()
                self.groups[name] = _dataclass_group(name, plain, skip)
            else:
                default = None if param.default is inspect.Parameter.empty else param.default
                if param.default is inspect.Parameter.empty and name not in positional:
                    self.required.append(name)
                self.options[name] = _Option((name,), base, default, "")
        self.reads_config = CONFIG in self.options

    # -- the parser ---------------------------------------------------------------------------

    def _describe(self) -> None:
        """Help texts from the docstrings (parsing them costs time a run does not need)."""
        if self._described:
            return
        self._described = True
        self.description, helps = _doc(self.function)
        for name, option in self.options.items():
            option.help = helps.get(name, "")
        for group in self.groups.values():
            description, helps = _doc(group.described_by)
            if group.dataclass is None:
                for key, option in group.options.items():
                    option.help = _first_sentence(helps.get(key, ""))
            else:
                group.description = description.split("\n")[0]
                for key, option in group.options.items():
                    option.help = helps.get(key, "")

    def parser(self, *, with_help: bool = True) -> argparse.ArgumentParser:
        """The argparse parser; ``with_help=False`` leaves the help texts out (a faster start)."""
        if with_help:
            self._describe()
        words = " ".join(name.upper() for name in self.positional)
        parser = _Parser(
            prog=self.prog,
            usage=f"{self.prog} {words + ' ' if words else ''}[options]",
            description=self.description,
            epilog=self.epilog,
            allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            argument_default=argparse.SUPPRESS,  # only what was given: YAML fills the rest
        )
        for name, option in self.options.items():
            self._add(parser, option, positional=name in self.positional)
        if self.reads_config:
            parser.add_argument(
                "--print-config", action="store_true", help="print the resolved settings as YAML"
            )
        if self.threads:
            parser.add_argument("--threads", metavar="N", help=THREADS_HELP)
        for group in self.groups.values():
            section = parser.add_argument_group(group.name, group.description)
            for option in group.options.values():
                self._add(section, option, positional=False)
        return parser

    def _add(self, parser: Any, option: _Option, *, positional: bool) -> None:
        hint, _ = _without_none(_metadata(option.hint)[0])
        kwargs: dict[str, Any] = {"help": option.help.replace("%", "%%"), "dest": option.dest}
        origin = typing.get_origin(hint)
        if origin is Literal:
            kwargs["choices"] = [str(choice) for choice in typing.get_args(hint)]
        if origin in (list, tuple) and not option.yaml_value:
            kwargs["nargs"] = "+"
            if not positional:
                kwargs["action"] = "extend"  # --source a b --source c: all three
        shown = self._shown_default(option, hint)
        if shown is not None:
            kwargs["help"] = f"{kwargs['help']} (default: {shown})".strip()
        if positional:
            kwargs.pop("dest")
            parser.add_argument(option.dest, **kwargs)
            return
        if hint is bool and len(option.path) == 1:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "choices" not in kwargs:
            kwargs["metavar"] = option.path[-1].upper()
        if option.path[0] in self.required and len(option.path) == 1 and not self.reads_config:
            kwargs["required"] = True
        names = [option.flag]
        if len(option.path) == 1 and option.path[0] in self.short:
            names.insert(0, self.short[option.path[0]])
        parser.add_argument(*names, **kwargs)

    @staticmethod
    def _shown_default(option: _Option, hint: Any) -> str | None:
        default = option.default
        if hint is bool and len(option.path) == 1:
            return "on" if default else None
        if default is None or default is inspect.Parameter.empty:
            return None
        if isinstance(default, float):
            return f"{default:.3g}"
        if isinstance(default, list | tuple):
            return " ".join(map(str, default)) if default else None
        return str(default)

    # -- settings -----------------------------------------------------------------------------

    def defaults(self) -> dict[str, Any]:
        """The settings before any preset, file or option: nested dict of plain values."""
        settings: dict[str, Any] = {
            name: option.default for name, option in self.options.items() if name != CONFIG
        }
        for name, group in self.groups.items():
            settings[name] = dict(group.defaults)
        return settings

    def from_command_line(self, namespace: argparse.Namespace) -> dict[str, Any]:
        """The options given on the command line, converted: a nested dict."""
        given: dict[str, Any] = {}
        for dest, value in vars(namespace).items():
            if dest in _PROCESS_OPTIONS:
                continue
            path = tuple(dest.split("."))
            option = (
                self.options[path[0]] if len(path) == 1 else self.groups[path[0]].options[path[1]]
            )
            try:
                converted = convert(value, option.hint)
            except _BadValue as error:
                raise UsageError(f"argument {option.flag}: {error}") from None
            if len(path) == 1:
                given[path[0]] = converted
            else:
                given.setdefault(path[0], {})[path[1]] = converted
        return given

    def from_yaml(self, path: Path) -> dict[str, Any]:
        """Settings from a YAML file (top-level keys: the parameters; nested: the groups)."""
        import yaml

        try:
            text = Path(path).read_text()
            loaded = yaml.safe_load(text)
        except OSError as error:
            raise InputError(f"--{CONFIG} {path}: cannot read ({error.strerror})") from error
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            problem = str(error).splitlines()[0]
            raise InputError(f"--{CONFIG} {path}: not a YAML file ({problem})") from error
        if loaded is None:
            return {}
        if not isinstance(loaded, dict):
            raise InputError(f"--{CONFIG} {path}: expected a mapping of settings")
        settings: dict[str, Any] = {}
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name in self.groups:
                if not isinstance(value, dict):
                    raise InputError(f"--{CONFIG} {path}: {name} must be a mapping of settings")
                group = self.groups[name]
                for field_key, field_value in value.items():
                    field_name = str(field_key).replace("-", "_")
                    if field_name not in group.options:
                        raise InputError(f"--{CONFIG} {path}: unknown setting {name}.{field_key}")
                    option = group.options[field_name]
                    settings.setdefault(name, {})[field_name] = self._yaml_value(
                        path, option, field_value
                    )
            elif name in self.options and name != CONFIG:
                settings[name] = self._yaml_value(path, self.options[name], value)
            else:
                raise InputError(f"--{CONFIG} {path}: unknown setting {key}")
        return settings

    @staticmethod
    def _yaml_value(path: Path, option: _Option, value: Any) -> Any:
        if option.yaml_value:
            return value
        try:
            return convert(value, option.hint)
        except _BadValue as error:
            raise InputError(f"--{CONFIG} {path}: {option.dest}: {error}") from None

    def resolve(self, argv: list[str]) -> tuple[dict[str, Any], bool]:
        """(settings, whether --print-config was given) for ``argv``; raises UsageError."""
        settings, print_config, _ = self._resolve(argv)
        return settings, print_config

    def _resolve(self, argv: list[str]) -> tuple[dict[str, Any], bool, int | None]:
        """:meth:`resolve`, and the value of --threads (None when not given)."""
        asks_help = any(arg in ("-h", "--help") for arg in argv)
        namespace = self.parser(with_help=asks_help).parse_args(canonical_spelling(argv))
        print_config = bool(getattr(namespace, "print_config", False))
        threads = getattr(namespace, "threads", None)
        if threads is not None:
            try:
                threads = convert(threads, int)
            except _BadValue as error:
                raise UsageError(f"argument --threads: {error}") from None
            if threads < 1:
                raise UsageError(f"argument --threads: at least 1 thread, not {threads}")
        given = self.from_command_line(namespace)
        layers = [self.from_yaml(path) for path in given.get(CONFIG) or []]
        settings = self.defaults()
        for layer in [*layers, given]:
            settings = _merge(settings, layer)
        if self.preset is not None:
            settings = _merge(self.defaults(), self.preset(settings))
            for layer in [*layers, given]:
                settings = _merge(settings, layer)
        missing = [name for name in self.required if settings.get(name) is None]
        if missing:
            flags = ", ".join(self.options[name].flag for name in missing)
            raise UsageError(f"the following arguments are required: {flags}")
        return settings, print_config, threads

    def arguments(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The function's keyword arguments: groups built into their dataclasses (whose own
        validation raises ValueError, reported as an invalid setting)."""
        arguments = {name: settings.get(name) for name in self.options}
        for name, group in self.groups.items():
            values = settings.get(name, {})
            if group.dataclass is None:
                arguments[name] = dict(values)
                continue
            try:
                arguments[name] = group.dataclass(**values)
            except (TypeError, ValueError) as error:
                raise InputError(f"invalid {name} setting: {error}") from error
        return arguments

    def settings_of(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Plain settings (YAML-ready) from the function's arguments: the inverse of
        :meth:`arguments`, the groups' skipped fields left out."""
        settings: dict[str, Any] = {}
        for name in self.options:
            if name != CONFIG:
                settings[name] = _plain(arguments.get(name))
        for name, group in self.groups.items():
            value = arguments.get(name)
            if value is None:
                settings[name] = {}
            elif group.dataclass is None:
                settings[name] = {key: _plain(item) for key, item in dict(value).items()}
            else:
                settings[name] = {
                    key: _plain(getattr(value, key)) for key in group.options if hasattr(value, key)
                }
        return settings

    def dump(self, settings: Mapping[str, Any]) -> str:
        """YAML text of plain settings (what ``--print-config`` prints and runs save)."""
        import yaml

        return yaml.safe_dump(_plain(dict(settings)), sort_keys=False)

    # -- running ------------------------------------------------------------------------------

    def run(self, argv: list[str]) -> int:
        """Parse ``argv``, call the function, return the exit status (see the module docstring)."""
        try:
            settings, print_config, threads = self._resolve(list(argv))
            arguments = self.arguments(settings)
            if print_config:
                print(self.dump(self.settings_of(arguments)), end="")
                return 0
        except UsageError as error:
            print(f"{self.prog}: error: {error} (see {self.prog} --help)", file=sys.stderr)
            return USAGE_ERROR
        except SystemExit as stop:  # --help
            return int(stop.code or 0)
        except ProtperfError as error:
            print(f"{self.prog}: error: {error}", file=sys.stderr)
            return INPUT_ERROR
        if threads is not None:
            from protperf.runtime import set_threads

            set_threads(threads)
        return call_verb(self.prog, self.function, arguments)


def call_verb(prog: str, function: Callable[..., Any], arguments: Mapping[str, Any]) -> int:
    """Call a verb's function: 0, or 1 with one line on stderr for bad input or an ``OSError``
    (the file it names and the system's reason), or 130 on Ctrl-C."""
    try:
        function(**arguments)
    except ProtperfError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return INPUT_ERROR
    except OSError as error:  # a missing file, permissions, a full or read-only disk
        if _full_disk(error) is not None:
            print(f"{prog}: error: {_full_disk(error)}", file=sys.stderr)
            return INPUT_ERROR
        where = f"{error.filename}: " if error.filename else ""
        print(f"{prog}: error: {where}{error.strerror or error}", file=sys.stderr)
        return INPUT_ERROR
    except Exception as error:  # a library's own words for a full disk (HDF5's, torch's)
        if _full_disk(error) is None:
            raise
        print(f"{prog}: error: {_full_disk(error)}", file=sys.stderr)
        return INPUT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0


def _full_disk(error: BaseException) -> Exception | None:
    """A :class:`~protperf.durable.DiskFullError` for an error that a full disk caused (naming
    the file when the error does, as HDF5's and Python's do), else None."""
    from protperf.durable import DiskFullError, full_disk_errno

    code = full_disk_errno(error)
    if code is None:
        return None
    path = getattr(error, "filename", None)
    if path is None:
        found = re.search(r"filename = '([^']*)'", str(error))  # HDF5's message
        path = found.group(1) if found else "the output"
    return DiskFullError(path, quota=code == errno.EDQUOT)


def _plain(value: Any) -> Any:
    """YAML-safe: paths as text, tuples as lists, dataclasses as dicts."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    return value


def run_verb(function: Callable[..., Any], argv: list[str], **options: Any) -> int:
    """``Verb(function, **options).run(argv)``: the entry point of a verb module's ``main``."""
    return Verb(function, **options).run(argv)
