"""The Dockerfile, checked without a Docker engine: it parses into instructions, its entry point is
`protperf`, it runs as a non-root user with data and runs as volumes, everything it copies exists
and survives .dockerignore, and the torch of its base image agrees with pyproject.toml."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER",
}  # fmt: skip


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, arguments = pending.strip().partition(" ")
        if keyword.upper() not in INSTRUCTIONS:
            raise ValueError(f"unknown Dockerfile instruction {keyword!r} in {pending!r}")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    if pending:
        raise ValueError(f"Dockerfile ends inside a continued line: {pending!r}")
    return instructions


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), value)


def _exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value)
    return value


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def torch_requirement() -> Requirement:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.name == "torch":
            return requirement
    raise AssertionError("pyproject.toml does not depend on torch")


def base_image(instructions: list[tuple[str, str]]) -> str:
    """The FROM image with the ARG defaults declared before it substituted."""
    args: dict[str, str] = {}
    for keyword, arguments in instructions:
        if keyword == "ARG" and "=" in arguments:
            name, _, default = arguments.partition("=")
            args[name.strip()] = default.strip().strip('"')
        if keyword == "FROM":
            return _expand(arguments.split()[0], args)
    raise AssertionError("no FROM instruction")


def test_parses_into_known_instructions(instructions):
    keywords = [keyword for keyword, _ in instructions]
    assert keywords.count("FROM") == 1
    assert set(keywords[: keywords.index("FROM")]) <= {"ARG"}  # only ARGs before FROM
    with pytest.raises(ValueError, match="unknown Dockerfile instruction"):
        parse_dockerfile("FROM x\nFORM y\n")
    [(keyword, arguments)] = parse_dockerfile("# c\nRUN a \\\n  # inside\n  && b\n")
    assert keyword == "RUN" and arguments.split() == ["a", "&&", "b"]


def test_base_image_is_cuda_pytorch_within_pyprojects_torch_range(instructions, torch_requirement):
    image = base_image(instructions)
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-\w+", image)
    assert match, f"expected an official CUDA PyTorch image, got {image}"
    torch_version, cuda_version = Version(match[1]), Version(match[2])
    assert torch_requirement.specifier.contains(torch_version), (
        f"{image}: torch {torch_version} outside pyproject's {torch_requirement}"
    )
    assert cuda_version >= Version("12.1")  # bf16 kernels and current GPUs


def test_whatever_it_installs_agrees_with_pyproject(instructions, torch_requirement):
    runs = " ".join(arguments for keyword, arguments in instructions if keyword == "RUN")
    # Any torch pin on a pip command line must fall inside pyproject's range.
    for pin in re.findall(r"\btorch==([\w.+]+)", runs):
        if "{" not in pin:  # a pin written by the build itself (the base image's own torch)
            assert torch_requirement.specifier.contains(Version(pin).base_version), pin
    assert re.search(r"pip install[^&]*--constraint", runs), "protperf installed unconstrained"
    assert re.search(r"pip install[^&]* \.(\s|$)", runs), "the package itself is not installed"
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["protperf"]  # the entry point the image calls


def test_entrypoint_user_and_volumes(instructions):
    entrypoints = [_exec_form(a) for k, a in instructions if k == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1] == ["protperf"]
    users = [arguments.split(":")[0] for keyword, arguments in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    volumes = [
        path
        for keyword, arguments in instructions
        if keyword == "VOLUME"
        for path in (_exec_form(arguments) if arguments.startswith("[") else arguments.split())
    ]
    workdir = [arguments for keyword, arguments in instructions if keyword == "WORKDIR"][-1]
    # protperf's defaults (data/<release>, runs/<config>) land in the volumes.
    assert f"{workdir}/data" in volumes and f"{workdir}/runs" in volumes


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_copied_paths_exist_and_are_not_dockerignored(instructions):
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [arguments for keyword, arguments in instructions if keyword in ("COPY", "ADD")]
    assert copies
    for arguments in copies:
        words = [word for word in shlex.split(arguments) if not word.startswith("--")]
        for source in words[:-1]:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not _ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    for needed in ("protperf/model.py", "pyproject.toml", "configs/performer-concat.yaml"):
        assert not _ignored(needed, patterns), needed
    for secret_or_bulky in (".git", ".venv", "data", "runs"):
        assert _ignored(secret_or_bulky, patterns), secret_or_bulky
