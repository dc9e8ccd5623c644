"""Stage boundaries point one way (data → backbone → fine-tune → statistics → merge → evaluate): an
earlier stage never imports a later one."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_merge"
FORBIDDEN = {"backbones": ("fisher", "merging", "modules", "statistics"),
             "data": ("backbones", "modules", "fisher", "merging", "statistics")}


def imported_subpackages(path: Path) -> set[str]:
    """``lightning_merge.<sub>`` of every import in a file, at any depth (function-local ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "lightning_merge" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_a_stage_does_not_import_a_later_one(stage):
    offending = {str(path.relative_to(PACKAGE)): sorted(imported_subpackages(path) & set(FORBIDDEN[stage]))
                 for path in sorted((PACKAGE / stage).glob("*.py"))}
    assert not {k: v for k, v in offending.items() if v}


def test_the_check_sees_imports():
    assert imported_subpackages(PACKAGE / "modules" / "fisher.py") >= {"backbones", "fisher"}
