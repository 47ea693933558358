"""The import package lives under platform/, which must never shadow the standard library's `platform`."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_platform_folder_is_not_a_package():
    assert (REPO / "platform" / "mixloop" / "__init__.py").is_file()
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_works_next_to_mixloop():
    import mixloop
    import platform

    assert Path(mixloop.__file__).resolve().parent == (REPO / "platform" / "mixloop").resolve()
    assert isinstance(platform.system(), str) and platform.system()
    assert Path(platform.__file__).resolve().parent == STDLIB


def test_stdlib_platform_wins_when_run_from_the_repo_root():
    # `python -c` puts the working directory first on sys.path: the worst case for shadowing.
    code = "import mixloop, platform; print(platform.system()); print(platform.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    system, location = result.stdout.split()
    assert system
    assert Path(location).resolve().parent == STDLIB
