"""ruff's lint and format checks over the package and the tests, as guards in `make test` (the rules
are pyproject.toml's [tool.ruff]): a change that breaks them is red the day it is made."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    assert RUFF, "ruff is not installed: it is one of the test extras (pip install -e '.[test]')"
    result = subprocess.run([RUFF, *command, "platform", "tests"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"ruff {' '.join(command)}: fix with `ruff check --fix` / `ruff format`\n{result.stdout}"
    )


def test_ruff_finds_a_planted_violation(tmp_path):
    """The check above can fail: an unused import and an unformatted line are found."""
    planted = tmp_path / "planted.py"
    planted.write_text("import os\nx=1\n")
    lint = subprocess.run(
        [RUFF, "check", "--config", str(REPO / "pyproject.toml"), str(planted)], capture_output=True, text=True
    )
    form = subprocess.run(
        [RUFF, "format", "--check", "--config", str(REPO / "pyproject.toml"), str(planted)],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 1 and "F401" in lint.stdout
    assert form.returncode == 1 and "would be reformatted" in form.stdout
