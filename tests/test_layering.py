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
}


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
