"""protperf's imports, read from its source (the AST): every package it imports is declared in
pyproject.toml, and its own modules import each other without cycles.

Cycles count every import, in functions too (only ``if TYPE_CHECKING:`` blocks are left out):
an import moved into a function still makes the two modules need each other, it only hides the
cycle until both are loaded in the wrong order. Two modules that need each other share a lower
one (../shared/docs/STYLE.md).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "protperf"
PYPROJECT = PACKAGE.parent / "pyproject.toml"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
#: Modules imported only once a check found their optional package (so their imports count as
#: guarded, like those under ``except ImportError``), and the check.
OPTIONAL_MODULES = {
    "protperf.favor.triton.": "protperf.favor.triton.available() finds Triton first",
}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _guarded_by_import_error(node: ast.Try) -> bool:
    names = {
        name.id if isinstance(name, ast.Name) else getattr(name, "attr", "")
        for handler in node.handlers
        for name in ([handler.type] if not isinstance(handler.type, ast.Tuple) else handler.type.elts)
    }  # fmt: skip
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def imports(module: str) -> list[tuple[str, bool, int]]:
    """(imported module, whether a ``try: ... except ImportError`` guards it, line) for every
    import of ``module`` outside ``if TYPE_CHECKING:``; relative imports resolved."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_one(other, guarded)
                continue
            visit_one(child, guarded)

    def visit_one(child: ast.AST, guarded: bool) -> None:
        if isinstance(child, ast.Import):
            found.extend((alias.name, guarded, child.lineno) for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                parent = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in child.names:  # `from protperf import tokenizer`: the submodule
                name = f"{base}.{alias.name}"
                found.append((name if name in MODULES else base, guarded, child.lineno))
        if isinstance(child, ast.Try) and _guarded_by_import_error(child):
            for statement in child.body:
                visit_one(statement, True)
            for part in (*child.handlers, *child.orelse, *child.finalbody):
                visit_one(part, guarded)
            return
        visit(child, guarded)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    """The dependencies' names, and each extra's, canonical."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11
    project = tomllib.loads(PYPROJECT.read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {_canonical(re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0]) for req in requirements}

    extras = {extra: names(reqs) for extra, reqs in project["optional-dependencies"].items()}
    return names(project["dependencies"]), extras


def test_every_imported_package_is_declared():
    """A top-level import maps to the distributions that provide it (packages_distributions);
    one of them must be declared, and the one named after the module itself when there is one
    (lightning_fabric: pytorch-lightning's wheel carries a copy, but protperf imports it by its
    own name). An import guarded by ``except ImportError`` may come from an extra only; any
    other must be a dependency."""
    dependencies, extras = _declared()
    in_extras = set().union(*extras.values())
    providers = importlib.metadata.packages_distributions()
    problems = []
    for module in MODULES:
        optional = any(module.startswith(prefix) for prefix in OPTIONAL_MODULES)
        for name, guarded, line in imports(module):
            guarded = guarded or optional
            top = name.partition(".")[0]
            if top == "protperf" or top in sys.stdlib_module_names or top == "__future__":
                continue
            candidates = {_canonical(dist) for dist in providers.get(top, [])} | {_canonical(top)}
            own = (
                _canonical(top)
                if _canonical(top) in {_canonical(d) for d in providers.get(top, [])}
                else None
            )
            allowed = dependencies | (in_extras if guarded else set())
            where = f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {top}"
            if not candidates & (dependencies | in_extras):
                problems.append(f"{where}: no dependency or extra provides it")
            elif not candidates & allowed:
                problems.append(f"{where}: only an extra provides it; guard it with ImportError")
            elif own is not None and own not in dependencies | in_extras:
                problems.append(f"{where}: declare {own} itself")
    assert problems == []


def test_lightning_fabric_is_declared_by_its_own_name():
    dependencies, _ = _declared()
    assert "lightning-fabric" in dependencies


def test_protperf_has_no_import_cycles():
    graph = {
        module: {name for name, _, _ in imports(module) if name in MODULES and name != module}
        for module in MODULES
    }
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                walk(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)
    assert cycles == []


def test_the_cycle_finder_finds_a_cycle(monkeypatch, tmp_path):
    """The same reading of imports sees the cycle that export.py and pretrained.py once had
    (one side imported in a function)."""
    package = tmp_path / "protperf"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from protperf.b import f\n")
    (package / "b.py").write_text("def f():\n    from protperf import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    monkeypatch.setattr(
        sys.modules[__name__], "MODULES", {_module_name(p): p for p in package.rglob("*.py")}
    )
    with_cycle = {name for name, _, _ in imports("protperf.b")}
    assert "protperf.a" in with_cycle
    try:
        test_protperf_has_no_import_cycles()
    except AssertionError as error:
        assert "protperf.a -> protperf.b -> protperf.a" in str(error)
    else:
        raise AssertionError("the cycle a -> b -> a went unnoticed")
