"""protperf.commandline: the one mechanism behind every verb's options, YAML files and errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import yaml

from protperf import cli
from protperf.commandline import Fields, Keywords, Verb, canonical_spelling
from protperf.errors import InputError


@dataclass
class Shape:
    """A toy group of settings."""

    width: int = 8
    """How wide."""
    rate: float = 0.5
    """How fast."""
    kind: Literal["a", "b"] = "a"
    """Which kind."""
    hidden: bool = False
    """Left out of the options."""

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ValueError(f"width must be positive, got {self.width}")


def toy_keywords(count: int = 1, label: str = "x", extra: Any = None) -> None:
    """A callable whose keywords a dict parameter takes."""


CALLS: list[dict[str, Any]] = []


def toy(
    source: Path,
    config: list[Path] | None = None,
    names: list[str] | None = None,
    steps: int = 3,
    max_length: int | None = None,
    fast: bool = False,
    mode: Literal["one", "two"] = "one",
    shape: Annotated[Shape | None, Fields(skip=frozenset({"hidden"}))] = None,
    keywords: Annotated[
        dict[str, Any] | None, Keywords(f"{__name__}.toy_keywords", defaults={"count": 5})
    ] = None,
) -> None:
    """Do a toy thing.

    Args:
        source: the input.
        config: YAML files.
        names: several names.
        steps: how many steps.
        max_length: an optional cap.
        fast: go fast.
        mode: which mode.
        shape: the shape.
        keywords: keyword settings.
    """
    CALLS.append({"source": source, "names": names, "steps": steps, "max_length": max_length,
                  "fast": fast, "mode": mode, "shape": shape, "keywords": keywords})  # fmt: skip
    if steps < 0:
        raise InputError(f"{source}: steps must be >= 0")


def _preset(settings: dict[str, Any]) -> dict[str, Any]:
    return {"shape": {"width": 64}} if settings["mode"] == "two" else {}


VERB = Verb(toy, prog="protperf toy", positional=("source",), short={"steps": "-s"}, preset=_preset)


def run(argv: list[str]) -> tuple[int, dict[str, Any] | None]:
    CALLS.clear()
    status = VERB.run(argv)
    return status, (CALLS[-1] if CALLS else None)


def test_spellings_hyphen_and_underscore_alike():
    assert canonical_spelling(["--max_length=3", "--shape.max-width", "x", "--", "--a_b"]) == [
        "--max-length=3", "--shape.max_width", "x", "--", "--a_b",
    ]  # fmt: skip
    for argv in (["--max-length", "7"], ["--max_length", "7"], ["--max_length=7"]):
        status, call = run(["in.fasta", *argv])
        assert status == 0 and call["max_length"] == 7
    status, call = run(["in.fasta", "--shape.width", "9", "--keywords.count", "2"])
    assert status == 0 and call["shape"] == Shape(width=9) and call["keywords"] == {"count": 2}
    status, call = run(["in.fasta", "-s", "11", "--fast", "--mode", "two"])
    assert status == 0 and (call["steps"], call["fast"], call["mode"]) == (11, True, "two")
    assert call["source"] == Path("in.fasta")


def test_defaults_preset_files_and_command_line_in_that_order(tmp_path):
    status, call = run(["in.fasta"])
    assert status == 0
    assert call["shape"] == Shape() and call["keywords"] == {"count": 5} and call["names"] is None
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("mode: two\nsteps: 4\nshape:\n  rate: 1.0e-3\nkeywords:\n  label: y\n")
    second.write_text("steps: 6\nkeywords:\n  extra: [1, 2]\n")
    status, call = run(["in.fasta", "--config", str(first), "--config", str(second)])
    assert status == 0
    assert call["steps"] == 6 and call["mode"] == "two"  # the later file wins
    assert call["shape"] == Shape(width=64, rate=1e-3)  # the preset of mode two, then the file
    assert call["keywords"] == {"count": 5, "label": "y", "extra": [1, 2]}
    status, call = run(["in.fasta", "--config", str(first), "--shape.width", "3", "--steps=1"])
    assert status == 0 and call["shape"].width == 3 and call["steps"] == 1  # the command line wins


def test_lists_several_values_repeated_options_or_one_yaml_list():
    for argv in (["--names", "a", "b", "--names", "c"], ["--names", '["a", "b", "c"]']):
        status, call = run(["in.fasta", *argv])
        assert status == 0 and call["names"] == ["a", "b", "c"]


def test_keyword_values_are_read_as_yaml():
    status, call = run(["in.fasta", "--keywords.extra", "{a: 1}", "--keywords.label", "bf16-mixed"])
    assert status == 0 and call["keywords"] == {
        "count": 5,
        "extra": {"a": 1},
        "label": "bf16-mixed",
    }
    status, call = run(["in.fasta", "--max-length", "null"])
    assert status == 0 and call["max_length"] is None


def test_print_config_prints_the_resolved_settings(capsys):
    assert VERB.run(["in.fasta", "--mode", "two", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["source"] == "in.fasta" and printed["mode"] == "two"
    assert printed["shape"] == {"width": 64, "rate": 0.5, "kind": "a"}  # "hidden" is skipped
    assert printed["keywords"] == {"count": 5}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: source"),
        (["in.fasta", "--bogus"], "unrecognized arguments: --bogus"),
        (["in.fasta", "--steps", "many"], "argument --steps: 'many' is not an integer"),
        (["in.fasta", "--mode", "three"], "argument --mode: invalid choice: 'three'"),
        (["in.fasta", "--shape.kind", "c"], "argument --shape.kind: invalid choice: 'c'"),
        (["in.fasta", "--shape.hidden", "true"], "unrecognized arguments: --shape.hidden true"),
        (["in.fasta", "--keywords.nope", "1"], "unrecognized arguments: --keywords.nope 1"),
        (["in.fasta", "--ste", "1"], "unrecognized arguments: --ste 1"),  # no abbreviations
    ],
)
def test_usage_errors_are_one_line_with_a_pointer_to_help(argv, message, capsys):
    status, call = run(argv)
    err = capsys.readouterr().err
    assert status == 2 and call is None
    assert err.count("\n") == 1 and "usage:" not in err
    assert err.startswith(f"protperf toy: error: {message}")
    assert err.rstrip().endswith("(see protperf toy --help)")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: [", "not a YAML file"),
        ("- a\n- b\n", "expected a mapping of settings"),
        ("stpes: 3\n", "unknown setting stpes"),
        ("shape:\n  hight: 3\n", "unknown setting shape.hight"),
        ("shape: 3\n", "shape must be a mapping of settings"),
        ("steps: many\n", "steps: 'many' is not an integer"),
        ("shape:\n  width: 0\n", "invalid shape setting: width must be positive, got 0"),
    ],
)
def test_bad_config_files_are_one_line_errors(text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    status, call = run(["in.fasta", "--config", str(path)])
    err = capsys.readouterr().err
    assert status == 1 and call is None and err.count("\n") == 1
    assert err.startswith("protperf toy: error: ") and message in err
    if "invalid shape" not in message:
        assert f"--config {path}: " in err


def test_binary_and_missing_config_files(tmp_path, capsys):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    for path, message in ((binary, "not a YAML file"), (tmp_path / "none.yaml", "cannot read")):
        status, _ = run(["in.fasta", "--config", str(path)])
        err = capsys.readouterr().err
        assert status == 1 and err.count("\n") == 1 and message in err and str(path) in err


def test_input_errors_raised_by_the_verb_are_one_line(capsys):
    status, call = run(["in.fasta", "--steps", "-1"])
    assert status == 1 and call is not None
    assert capsys.readouterr().err == "protperf toy: error: in.fasta: steps must be >= 0\n"


def test_help_lists_options_groups_and_defaults(capsys):
    assert VERB.run(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: protperf toy SOURCE [options]\n\nDo a toy thing.")
    for text in ("--max-length MAX_LENGTH", "-s STEPS, --steps STEPS", "(default: 3)",
                 "--fast, --no-fast", "--shape.width WIDTH", "How wide. (default: 8)",
                 "--keywords.count COUNT", "(default: 5)", "--print-config"):  # fmt: skip
        assert text in out, text
    assert "--shape.hidden" not in out


def test_every_verb_uses_the_one_mechanism():
    """Each verb module's main runs through commandline (no parser of its own)."""
    root = Path(cli.__file__).parent
    for module, _ in cli.VERBS.values():
        source = (root / (module.split(".")[-1] + ".py")).read_text()
        assert "argparse" not in source and "jsonargparse" not in source, module
        assert "run_verb(" in source or "Verb(" in source, module


def test_a_verb_starts_without_importing_torch():
    """`protperf plot --help` imports neither torch nor Lightning: a verb pays only for what it
    imports itself (the start-up benchmark times every verb)."""
    code = (
        "import sys; from protperf import cli; cli.main(['plot', '--help']); "
        "print(sorted(m for m in ('torch', 'pytorch_lightning') if m in sys.modules))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().endswith("[]"), completed.stdout
