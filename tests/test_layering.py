"""The house rules of docs/ARCHITECTURE.md, read from the source: who may import what, and no
import circle between modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pacs_node"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(top_level_only: bool = False) -> dict[str, set[str]]:
    """Every module of the package -> the modules it imports (absolute names; `from p import
    m` of a submodule `m` counts as importing `p.m`, not the package's `__init__`). With
    `top_level_only`, the imports run when the module loads (not those inside functions, which
    run at call time: `storage.target.build_target` loads a backend only when asked for it)."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in paths.items():
        names: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body if top_level_only else ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    names.add(sub if sub in paths else node.module)
        found[name] = names
    return found


IMPORTS = _imports()
LOAD_TIME_IMPORTS = _imports(top_level_only=True)


def _importers(prefix: str) -> set[str]:
    return {
        module
        for module, names in IMPORTS.items()
        if any(n == prefix or n.startswith(prefix + ".") for n in names)
    }


@pytest.mark.parametrize(
    ("library", "room"),
    [
        ("pynetdicom", "pacs_node.dimse"),
        ("peewee", "pacs_node.index"),
        ("boto3", "pacs_node.storage"),
        ("botocore", "pacs_node.storage"),
    ],
)
def test_only_one_room_imports_each_library(library: str, room: str) -> None:
    outside = sorted(m for m in _importers(library) if not m.startswith(room))
    assert outside == [], f"{library} imported outside {room}: {outside}"


def test_storage_holds_byte_stores_only() -> None:
    for forbidden in ("pacs_node.index", "pacs_node.audit", "pacs_node.config"):
        offenders = sorted(m for m in _importers(forbidden) if m.startswith("pacs_node.storage"))
        assert offenders == [], f"storage/ imports {forbidden}: {offenders}"


def test_no_import_circle() -> None:
    modules = set(LOAD_TIME_IMPORTS)
    graph = {m: {n for n in LOAD_TIME_IMPORTS[m] if n in modules and n != m} for m in modules}
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*path[path.index(n) :], n]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m)
