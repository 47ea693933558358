"""A search's objectives: arithmetic over eval metrics against the start version (loss.X, gain.X,
forgetting.X), parsed with Python's own parser and evaluated without eval()."""

from __future__ import annotations

import ast
import operator

OBJECTIVE_TERMS = ("loss", "gain", "forgetting")


def objective_keys(count: int) -> list[str]:
    """The names the objectives are reported under: `objective`, or objective_1... for a Pareto search."""
    return ["objective"] if count == 1 else [f"objective_{i + 1}" for i in range(count)]


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def objective_value(expression: str, losses: dict[str, float], start_losses: dict[str, float]) -> float:
    """The expression's value for a model with these eval losses, started from one with `start_losses`."""
    terms = {
        "loss": losses,
        "gain": {c: start_losses[c] - losses[c] for c in losses},
        "forgetting": {c: losses[c] - start_losses[c] for c in losses},
    }

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.BinOp):
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):  # the only constants allowed
            return float(node.value)
        kind, corpus = _term(node)
        return terms[kind][corpus]

    return float(value(ast.parse(expression, mode="eval").body))


def objective_terms(expression: str) -> list[tuple[str, str]]:
    """The (kind, corpus) pairs an expression uses; ValueError naming what is not allowed."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an expression ({exc.msg})") from None
    terms = []
    for node in _operands(tree.body):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            continue
        terms.append(_term(node))
    return terms


def _operands(node: ast.AST):
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        yield from _operands(node.left)
        yield from _operands(node.right)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        yield from _operands(node.operand)
    else:
        yield node


def _term(node: ast.AST) -> tuple[str, str]:
    """loss.X or loss["X"] (for corpus names that are not identifiers)."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        kind, corpus = node.value.id, node.attr
    elif (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Name)
        and isinstance(node.slice, ast.Constant)
        and isinstance(node.slice.value, str)
    ):
        kind, corpus = node.value.id, node.slice.value
    else:
        raise ValueError(
            f"{ast.unparse(node)!r} is not allowed: use numbers, + - * /, and "
            f"{', '.join(k + '.CORPUS' for k in OBJECTIVE_TERMS)}"
        )
    if kind not in OBJECTIVE_TERMS:
        raise ValueError(f"{kind!r} is not a metric: use {', '.join(OBJECTIVE_TERMS)}")
    return kind, corpus
