"""The library's shape, kept by tests so it does not drift back: every function short enough
to read on one screen, the trainers' ``train`` a recipe, and no module reaching into
another's private names (shared helpers live, public, where their name says)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stable_rlhf"
MAX_FUNCTION_LINES = 80
RECIPES = {  # train() of each trainer reads like the algorithm: a short list of named steps
    "ppo.py": 50,
    "rejection_sampling.py": 50,
    "sft.py": 50,
    "reward_model.py": 50,
}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_the_checks_read_real_code():
    names = {name for path in modules() for name, _, _ in functions(path)}
    assert {"train", "generate", "gae"} <= names and len(modules()) > 20


def test_every_function_is_at_most_80_lines():
    long = [f"{path.relative_to(PACKAGE)}:{line} {name} ({n} lines)"
            for path in modules() for name, line, n in functions(path) if n > MAX_FUNCTION_LINES]
    assert not long, "split these into named steps:\n" + "\n".join(long)


@pytest.mark.parametrize("module, limit", sorted(RECIPES.items()))
def test_trainers_train_is_a_short_recipe(module, limit):
    sizes = [n for name, _, n in functions(PACKAGE / module) if name == "train"]
    assert len(sizes) == 1, f"{module} should have exactly one train()"
    assert sizes[0] <= limit, f"{module} train() is {sizes[0]} lines (at most {limit})"


def private_imports(path: Path) -> list[str]:
    """``from .x import _name`` / ``from stable_rlhf.x import _name`` and ``x._name`` uses of an
    imported project module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found, project_modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("stable_rlhf")):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{path.name}:{node.lineno} imports {alias.name}")
                else:
                    project_modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in project_modules):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_private_import_check_catches_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .models import _tiny_policy\nfrom . import models\nmodels._gguf_key(None)\n")
    assert len(private_imports(bad)) == 2


def test_no_private_name_is_imported_across_modules():
    found = [hit for path in modules() for hit in private_imports(path)]
    assert not found, "\n".join(found)
