"""The house rules that keep the code easy to change, checked on the source: only vtrans/engine.py uses the
distributed stack (deepspeed, torch.distributed); model and mask code import neither the engine nor the jobs; jobs do
not import one another."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

VTRANS = Path(__file__).resolve().parents[1] / "vtrans"
SOURCES = sorted(VTRANS.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            prefix = "." * node.level + (node.module or "")
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", [p for p in SOURCES if p.name != "engine.py"], ids=lambda p: str(p.relative_to(VTRANS)))
def test_only_the_engine_uses_the_distributed_stack(path):
    uses = [node.lineno for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)
            and node.attr == "distributed" and isinstance(node.value, ast.Name) and node.value.id == "torch"]
    assert not uses, f"{path} uses torch.distributed on lines {uses}"
    assert not any(n == "deepspeed" or n.startswith("deepspeed.") for n in _imports(path)), f"{path} imports deepspeed"


@pytest.mark.parametrize("path", sorted((VTRANS / "models").glob("*.py")) + sorted((VTRANS / "masks").glob("*.py")),
                         ids=lambda p: str(p.relative_to(VTRANS)))
def test_model_and_mask_code_import_no_engine_and_no_job(path):
    bad = [n for n in _imports(path) if re.search(r"(^|\.)(engine|jobs|pipeline)(\.|$)", n)]
    assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("path", sorted((VTRANS / "jobs").glob("*.py")), ids=lambda p: p.name)
def test_jobs_do_not_import_one_another(path):
    jobs = {p.stem for p in (VTRANS / "jobs").glob("*.py")} - {"__init__"}
    bad = [n for n in _imports(path) if any(re.search(rf"(^|\.){j}(\.|$)", n) for j in jobs if j != path.stem)
           and n.startswith(".")]
    assert not bad, f"{path} imports {bad}"
