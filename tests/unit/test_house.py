"""House rules of platform/mixloop, checked rather than hoped for (issue 29):

- a module has at most 400 lines;
- a function or method has at most 60, from its `def` line to its last line (ast's `lineno` to
  `end_lineno`: decorators do not count, its docstring and nested functions do);
- no import cycle among mixloop's modules, imports inside functions included. The graph has an edge
  for every `import mixloop.x` and `from mixloop.x import y` (relative ones resolved): to `mixloop.x.y`
  when `y` is a submodule, else to `mixloop.x`, a package standing for its `__init__`;
- an import inside a function says why it is there: a comment `# lazy: <reason>` on the import's
  own lines, or in the comment lines directly above the first of the run of import statements it
  belongs to (statements of one block one after the other, blank lines between them allowed).
  A function-level import is for a heavy or optional dependency (torch, ray, transformers, ... or a
  mixloop module that pulls one in) or for keeping `mixloop --help` fast; anything else goes at the
  top of its module.

Each rule is a function of a package folder, so the tests below also plant one violation of each in
a small tree and see it reported.
"""

from __future__ import annotations

import ast
import io
import re
import textwrap
import tokenize
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "platform" / "mixloop"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LAZY_COMMENT = re.compile(r"#\s*lazy:\s*\S")

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
IMPORTS = (ast.Import, ast.ImportFrom)


def _modules(package: Path) -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) for every module of the package; a package is named by its __init__."""
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _where(package: Path, path: Path, line: int | None = None) -> str:
    where = str(path.relative_to(package.parent))
    return f"{where}:{line}" if line is not None else where


def oversized_modules(package: Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    """`file: N lines` for every module of more than `limit` lines."""
    return [
        f"{_where(package, path)}: {count} lines"
        for _, path in _modules(package)
        if (count := len(path.read_text().splitlines())) > limit
    ]


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """Every function and method with its qualified name (Class.method, outer.<locals>.inner)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, FUNCTIONS):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.<locals>.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def long_functions(package: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`file:line: name has N lines` for every function longer than `limit`, `def` to last line."""
    found = []
    for _, path in _modules(package):
        for name, node in _functions(ast.parse(path.read_text())):
            if (count := node.end_lineno - node.lineno + 1) > limit:
                found.append(f"{_where(package, path, node.lineno)}: {name} has {count} lines")
    return found


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]) -> list[str]:
    """The package's modules an import statement in `module` imports: `from pkg import mod` the
    submodule `pkg.mod`, `from pkg import name` pkg's __init__, `import pkg.mod` `pkg.mod`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    base = node.module or ""
    if node.level:  # relative: from the module's package (a package's own __init__ is its package)
        anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
        base = ".".join(anchor + ([base] if base else []))
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
    names_from_init = len(submodules) < len(node.names) and base in modules
    return submodules + ([base] if names_from_init else [])


def import_graph(package: Path) -> dict[str, dict[str, list[tuple[Path, int]]]]:
    """module -> imported module -> where [(file, line), ...], for imports between the package's modules."""
    modules = dict(_modules(package))
    graph: dict[str, dict[str, list[tuple[Path, int]]]] = {name: {} for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, IMPORTS):
                for target in _imported(name, path.name == "__init__.py", node, set(modules)):
                    if target != name:
                        graph[name].setdefault(target, []).append((path, node.lineno))
    return graph


def _strongly_connected(graph: dict[str, dict]) -> list[list[str]]:
    """Tarjan's components of more than one module (a module importing itself is skipped above)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _shortest_cycle(graph: dict[str, dict], start: str, members: set[str]) -> list[str]:
    """Breadth-first from `start` back to it inside one component: [start, ..., start]."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target == start:
                    return paths[node] + [start]
                if target in members and target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{start} is in a component but on no cycle")


def import_cycles(package: Path) -> list[str]:
    """One report per group of modules that import one another (a strongly connected component):
    its shortest cycle through its first module, each edge with the file:line of its imports, and how
    many more edges the group has."""
    graph = import_graph(package)
    found = []
    for component in _strongly_connected(graph):
        cycle = _shortest_cycle(graph, component[0], set(component))
        edges = [
            f"    {source} -> {target} ({', '.join(_where(package, path, line) for path, line in graph[source][target])})"
            for source, target in zip(cycle, cycle[1:])
        ]
        others = sum(1 for source in component for target in graph[source] if target in component) - len(edges)
        found.append(
            f"cycle {' -> '.join(cycle)}:\n"
            + "\n".join(edges)
            + (f"\n    (+{others} more edges among {component})" if others else "")
        )
    return found


def _comments(source: str) -> dict[int, str]:
    return {
        token.start[0]: token.string
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }


def _explained(node: ast.stmt, body: list[ast.stmt], lines: list[str], comments: dict[int, str]) -> bool:
    if any(LAZY_COMMENT.search(comments.get(line, "")) for line in range(node.lineno, node.end_lineno + 1)):
        return True
    first = body.index(node)
    while first and isinstance(body[first - 1], IMPORTS):  # the run of imports it belongs to
        first -= 1
    line = body[first].lineno - 1
    while line >= 1 and lines[line - 1].lstrip().startswith("#"):
        if LAZY_COMMENT.search(comments.get(line, "")):
            return True
        line -= 1
    return False


def _function_imports(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.stmt, list[ast.stmt]]]:
    """(import, the statements of its block) for every import inside a function, in one walk."""
    for field in ("body", "orelse", "finalbody"):
        body = getattr(node, field, None)
        if in_function and isinstance(body, list):
            yield from ((statement, body) for statement in body if isinstance(statement, IMPORTS))
    for child in ast.iter_child_nodes(node):
        yield from _function_imports(child, in_function or isinstance(child, FUNCTIONS))


def unexplained_lazy_imports(package: Path) -> list[str]:
    """`file:line: the import` for every import inside a function without its `# lazy: <reason>`."""
    found = []
    for _, path in _modules(package):
        source = path.read_text()
        lines, comments = source.splitlines(), _comments(source)
        found += [
            f"{_where(package, path, node.lineno)}: {lines[node.lineno - 1].strip()}"
            for node, body in _function_imports(ast.parse(source))
            if not _explained(node, body, lines, comments)
        ]
    return found


def _report(title: str, offenders: list[str]) -> str:
    return f"{len(offenders)} {title}:\n" + "\n".join(offenders)


def test_modules_are_at_most_400_lines():
    offenders = oversized_modules(PACKAGE)
    assert not offenders, _report(f"modules over {MAX_MODULE_LINES} lines (split by concern)", offenders)


def test_functions_are_at_most_60_lines():
    offenders = long_functions(PACKAGE)
    assert not offenders, _report(f"functions over {MAX_FUNCTION_LINES} lines (split them)", offenders)


def test_no_import_cycles():
    offenders = import_cycles(PACKAGE)
    assert not offenders, _report("import cycles (move the shared piece where it belongs)", offenders)


def test_function_level_imports_say_why():
    offenders = unexplained_lazy_imports(PACKAGE)
    assert not offenders, _report(
        "imports inside functions without '# lazy: <reason>' (move the rest to the module's top)", offenders
    )


def _plant(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_a_401_line_module_is_reported(tmp_path):
    package = _plant(tmp_path, {"big.py": "x = 1\n" * 401, "fine.py": "x = 1\n" * 400})
    assert oversized_modules(package) == ["pkg/big.py: 401 lines"]


def test_a_61_line_function_is_reported(tmp_path):
    body = "    x = 1\n"
    source = (
        "@decorator\n"
        + "def sixty():\n"
        + body * 59
        + "class Holder:\n    def sixty_one(self):\n"
        + "        x = 1\n" * 60
    )
    package = _plant(tmp_path, {"long.py": source})
    assert long_functions(package) == ["pkg/long.py:63: Holder.sixty_one has 61 lines"]


def test_a_cycle_through_a_lazy_import_is_reported(tmp_path):
    package = _plant(
        tmp_path,
        {
            "a.py": "from pkg.b import helper\n",
            "b.py": "def helper():\n    from pkg import a  # lazy: planted\n",
            "c.py": "import pkg.a\n",
        },
    )
    cycles = import_cycles(package)
    assert len(cycles) == 1
    assert "pkg.a -> pkg.b -> pkg.a" in cycles[0]
    assert "pkg/a.py:1" in cycles[0] and "pkg/b.py:2" in cycles[0]


def test_a_package_import_stands_for_its_init(tmp_path):
    package = _plant(
        tmp_path,
        {
            "sub/__init__.py": "from pkg.sub.inner import thing\n",
            "sub/inner.py": "thing = 1\n",
            "sub/other.py": "from pkg.sub import thing\n",  # the package's __init__, no cycle
            "user.py": "from pkg.sub import inner\n",  # the submodule, not the __init__
        },
    )
    graph = import_graph(package)
    assert set(graph["pkg.sub.other"]) == {"pkg.sub"}
    assert set(graph["pkg.user"]) == {"pkg.sub.inner"}
    assert import_cycles(package) == []


def test_an_unexplained_lazy_import_is_reported(tmp_path):
    source = textwrap.dedent(
        """\
        import json


        def heavy():
            import torch  # lazy: heavy


        def group():
            # lazy: the imports below pull in Ray
            import ray
            from ray import train

            from pkg import heavy

            return ray, train, heavy


        def nested():
            if True:
                import os
            return os


        def no_reason():
            import csv  # lazy:


        def after_code():
            # lazy: this comment is about the next line only
            x = 1
            import sys
        """
    )
    package = _plant(tmp_path, {"lazy.py": source})
    assert unexplained_lazy_imports(package) == [
        "pkg/lazy.py:20: import os",
        "pkg/lazy.py:25: import csv  # lazy:",
        "pkg/lazy.py:31: import sys",
    ]
