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
    import platform

    import mixloop

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


def test_every_import_of_a_mixloop_name_resolves_lazy_ones_too():
    """Commands import inside functions (so `mixloop --help` stays fast); a name moved elsewhere would
    only fail when that command runs, e.g. a benchmark nobody ran since the move."""
    import ast
    import importlib

    broken = []
    for path in sorted((REPO / "platform" / "mixloop").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mixloop"):
                module = importlib.import_module(node.module)
                broken += [
                    f"{path.relative_to(REPO)}:{node.lineno}: {node.module}.{alias.name}"
                    for alias in node.names
                    if not hasattr(module, alias.name)
                    and importlib.util.find_spec(f"{node.module}.{alias.name}") is None
                ]
    assert not broken, broken
