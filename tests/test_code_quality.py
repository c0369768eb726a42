"""ruff, mypy and import-linter are part of the suite: the code stays lint- and type-clean,
and its layers stay as pyproject.toml's contracts draw them."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_ruff_is_clean() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "src", "tests", "bench", "examples"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_contracts_are_kept() -> None:
    # lint-imports has no ``python -m`` entry: call its console script's function, so that
    # the venv running the tests is the one checked. No cache: nothing left in the tree.
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
