"""The layers, enforced: import-linter's contracts (pyproject.toml [tool.importlinter]) and
the one-place rule for stage names.

    iterdpo.cli (the dispatcher) -> iterdpo_operator | each stage program -> the core (iterdpo)

and only the operator's API module (kube.py; kopf in handlers and main) talks to Kubernetes.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")  # import-linter, from the test extra


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": str(LINT_IMPORTS.parent), "HOME": str(cwd)}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_layering_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_core_importing_the_operator_breaks_a_contract(tmp_path):
    """The contracts can fail: a copy of the tree whose planner imports the operator is refused."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    packages = tmp_path / "packages"  # each package by its import name, as the wheel installs it
    packages.mkdir()
    for name, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        shutil.copytree(REPO / folder, packages / name, ignore=shutil.ignore_patterns("__pycache__"))
    planner = packages / "iterdpo" / "planner.py"
    planner.write_text(planner.read_text() + "\nimport iterdpo_operator.builders  # the layering mistake\n")
    result = lint_imports(tmp_path, pythonpath=packages)
    assert result.returncode != 0, result.stdout[-4000:]
    assert "iterdpo is not allowed to import iterdpo_operator.builders" in result.stdout
    assert "iterdpo.planner -> iterdpo_operator.builders" in result.stdout


# -- stage names live in the two tables ------------------------------------------------------
# Every spelling a stage has had: its name, its status field, its folder, its child and pod words.
STAGE_WORDS = {"Generate", "generate", "generation", "Score", "score", "scoring", "annotate", "Train", "train",
               "training"}  # fmt: skip
TABLES = {"iterdpo/stages.py", "operator/stage_children.py"}
# The same words meaning something else (checked one by one, with the reason).
OTHER_MEANINGS = {
    ("iterdpo/spec.py", "train"): "a dataset's default split name",
    ("iterdpo/spec.py", "training"): "the spec section spec.training, where rules sit",
    ("iterdpo/tiny.py", "train"): "a word of the tiny models' vocabulary",
    ("iterdpo/runfile.py", "training"): "the spec field reward.training",
    ("iterdpo/runfile.py", "sft"): "the spec field policy.sft",
    ("services/reward_server/judge.py", "training"): "the spec field reward.training",
    ("services/trainer/cli.py", "train"): "the Train stage's log prefix",
    ("operator/handlers.py", "generation"): "Kubernetes' metadata.generation",
    ("services/reward_server/scorers.py", "score"): "the score head's weight names in a checkpoint",
}


def _product_files() -> list[Path]:
    roots = [REPO / folder for folder in PYPROJECT["tool"]["setuptools"]["package-dir"].values()]
    return sorted(p for root in roots for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def test_stage_names_are_spelled_only_in_the_two_stage_tables():
    found = []
    for path in _product_files():
        rel = path.relative_to(REPO).as_posix()
        if rel in TABLES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in STAGE_WORDS and (rel, node.value) not in OTHER_MEANINGS:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not found, "a stage named outside iterdpo/stages.py and operator/stage_children.py:\n" + "\n".join(found)
    assert all(rel in {p.relative_to(REPO).as_posix() for p in _product_files()} for rel, _ in OTHER_MEANINGS)
