"""The repository's operator/ folder must never shadow the standard library's `operator`."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_operator_folder_is_not_a_regular_package():
    # A regular package (with __init__.py) at the repository root would win over the stdlib
    # module for `python -m ...` run from there (`python -m venv` in scripts/setup.sh broke).
    assert not (REPO / "operator" / "__init__.py").exists()
    out = subprocess.run([sys.executable, "-c", "import operator; print(operator.eq)"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "built-in" in out.stdout, out.stderr
