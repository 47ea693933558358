"""platform/mixloop type-checks clean under mypy (issue 29), with the configuration in pyproject.toml:
every function body checked (annotated or not), the pydantic plugin, and strict mode for the packages
that define mixloop's records (config, versioning.lineage, train.metrics, storage.layout).
Third-party packages without types are listed by name there; no other import goes unchecked.

`mypy_errors` is a function of a source folder, so the tests below also plant errors in a small tree
(a wrong return type; an unannotated function in a strict package and in another) and see mypy
report what the configuration says it should.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).parents[2]
PYPROJECT = REPO / "pyproject.toml"
ERROR = re.compile(r"^(?P<path>\S+?):\d+: error: .*\[(?P<code>[a-z-]+)\]$")


def mypy_errors(cwd: Path, *paths: str, cache_dir: Path | None = None) -> tuple[list[str], str]:
    """(the error lines, the whole output) of mypy run in `cwd` with the repository's configuration, on
    `paths` (none: the configuration's own `files`)."""
    cache = ["--cache-dir", str(cache_dir)] if cache_dir is not None else []
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(PYPROJECT), *cache, *paths],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode in (0, 1), f"mypy did not run (exit {result.returncode}):\n{output}"
    return [line for line in output.splitlines() if ERROR.match(line)], output


def test_mixloop_type_checks_clean():
    errors, output = mypy_errors(REPO)
    assert not errors, f"{len(errors)} mypy errors (fix the types; see docs/ARCHITECTURE.md, house rules):\n{output}"


def _plant(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / "platform" / "mixloop" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_planted_errors_are_reported_and_strictness_stays_in_its_packages(tmp_path):
    _plant(
        tmp_path,
        {
            "__init__.py": "",
            "wrong.py": """\
                def steps(tokens: int) -> int:
                    return f"{tokens} tokens"
                """,
            "loose.py": """\
                def untyped(value):
                    return value
                """,
            "config/__init__.py": """\
                def untyped(value):
                    return value
                """,
        },
    )
    errors, output = mypy_errors(tmp_path, "platform/mixloop", cache_dir=tmp_path / "cache")
    found = sorted((match["path"], match["code"]) for match in map(ERROR.match, errors) if match)
    assert found == [
        ("platform/mixloop/config/__init__.py", "no-untyped-def"),  # strict: config defines the spec's records
        ("platform/mixloop/wrong.py", "return-value"),  # checked everywhere
    ], output  # loose.py, outside the strict packages, may leave a function unannotated
