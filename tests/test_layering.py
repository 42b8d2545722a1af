"""Package boundaries: data flows network -> storage -> scheduler -> ai -> writers -> sender."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "config": {"ai", "storage", "dicom_node"},
    "storage": {"pynetdicom", "torch", "ai", "dicom_node", "monai"},
    "ai": {"dicom_node", "storage", "pynetdicom"},
    # the network side reaches the catalog only through storage's functions and records
    "dicom_node": {"sqlalchemy", "alembic"},
}
STORAGE_ENUMS = {"JobState", "OutboxState", "StudyState"}
"""What of ``storage.models`` other packages may name: its enums, never an ORM class."""


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_what_it_must_not(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN[package]) for f in files}
    offenders = {k: v for k, v in offenders.items() if v}
    assert offenders == {}


def test_nothing_reads_the_environment_at_import_time():
    for package in ("config", "storage", "ai", "dicom_node"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in tree.body:  # module level statements only
                text = ast.unparse(node)
                if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
                    continue
                assert "os.environ" not in text and "getenv" not in text, path


def _from_imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """``(module, names, at module level)`` of every absolute ``from`` import."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    return [
        (node.module, [a.name for a in node.names], id(node) in top)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
    ]


def test_only_storage_names_its_orm_classes():
    offenders = {}
    for package in ("dicom_node", "ai", "config"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for module, names, _ in _from_imports(path):
                if module == "storage.models" and set(names) - STORAGE_ENUMS:
                    offenders[str(path.relative_to(ROOT))] = sorted(set(names) - STORAGE_ENUMS)
    assert offenders == {}


def test_storage_modules_import_each_other_without_a_cycle():
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "storage").glob("*.py")):
        name = f"storage.{path.stem}" if path.stem != "__init__" else "storage"
        graph[name] = {
            m
            for m, _, _ in _from_imports(path)
            if m.startswith("storage.") and m.count(".") == 1 and name != "storage"
        }
    seen: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert seen.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in seen:
                visit(nxt, [*path, node])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [])
    assert "storage.catalog" in graph and graph["storage.jobs"]
