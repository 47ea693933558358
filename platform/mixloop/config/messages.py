"""Structural problems in words: a pydantic error turned into its YAML path, what was expected, what
was found, and what to write instead."""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from mixloop.config.schema import BUILTIN_DEFAULTS, STAGE_NAME_PATTERN, LRConfig, StageSettings
from mixloop.config.strict import unwrap_optional


def format_problems(path: str | Path, problems: list[str], what: str = "pipeline") -> str:
    lines = [f"{path}: {len(problems)} problem(s) in the {what} spec:"]
    lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)


Loc = tuple[int | str, ...]  # a YAML path, as pydantic's errors give it


class _Place(typing.NamedTuple):
    """What a YAML path leads to in the spec models."""

    annotation: Any = None  # the type of the value there (Optional unwrapped)
    name: str | None = None  # the last model field on the way, its FieldInfo and its model
    field: Any = None
    owner: type | None = None
    bounds: tuple[Any, ...] = ()  # annotated_types constraints on the value: Gt, Ge, Lt, Le


def _yaml_path(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _describe(error: ErrorDetails, root: type[BaseModel]) -> str:
    loc, kind = tuple(error["loc"]), error["type"]
    where = _yaml_path(loc)
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], root)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{where}: unknown key. Fix: {hint}remove it or use one of: {', '.join(allowed)}."
    doc = _field_doc(loc, root)
    about = f" ({doc.rstrip('.')})" if doc else ""
    if kind == "missing":
        return f"{where}: required but missing. Fix: add it{about}."
    got = _shown(error.get("input"))
    if kind == "too_short":  # pydantic's words, without its "after validation"
        least = (error.get("ctx") or {}).get("min_length")
        return f"{where}: {error['msg'].split(' after validation')[0]}, got {got}. Fix: give at least {least}{about}."
    wanted = _expected(error, _walk(loc, root))
    if wanted is None:
        return f"{where}: {error['msg']} (got {got}). Fix: {doc or 'correct the value'}."
    expected, fix = wanted
    return f"{where}: expected {expected}, got {got}. Fix: {fix}{about}."


_NUMBER_ERRORS = ("int_parsing", "int_type", "int_from_float", "float_parsing", "float_type", "finite_number")
_BOUND_WORDS = {
    "gt": "greater than",
    "ge": "greater than or equal to",
    "lt": "less than",
    "le": "less than or equal to",
}
_BOUND_ERRORS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}
# The patterns of the spec models in words.
_PATTERN_WORDS = {STAGE_NAME_PATTERN: "a name of lowercase letters, digits, '_', '.' and '-'"}


def _expected(error: ErrorDetails, place: _Place) -> tuple[str, str] | None:
    """What the value should be and what to write instead, from pydantic's error type; None: unknown type."""
    kind, ctx = error["type"], error.get("ctx") or {}
    whole = place.annotation is int or kind.startswith("int")
    number = "a whole number" if whole else "a number"
    example = _example(place, whole)
    such = f" such as {example}" if example is not None else ""
    if kind in _NUMBER_ERRORS:
        return number, f"write {number}{such}"
    if kind in _BOUND_ERRORS:
        key = _BOUND_ERRORS[kind]
        limits = _bounds_text(place.bounds) or f"{_BOUND_WORDS[key]} {_number(ctx.get(key))}"
        return f"{number} {_BOUND_WORDS[key]} {_number(ctx.get(key))}", f"write {number} {limits}{such}"
    if kind in ("bool_parsing", "bool_type"):
        return "true or false", "write true or false"
    if kind == "literal_error":
        values = [str(v) for v in typing.get_args(place.annotation)]
        close = difflib.get_close_matches(str(error.get("input")), values, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"one of {', '.join(values)}", f"{hint}write one of: {', '.join(values)}"
    if kind == "string_pattern_mismatch":
        pattern = ctx.get("pattern", "")
        if pattern in _PATTERN_WORDS:
            return _PATTERN_WORDS[pattern], f"write e.g. {_matching(error.get('input'), pattern)!r}"
        return f"text matching the regular expression {pattern}", "write text that matches it"
    if kind == "string_type":
        return "text", "write text (in quotes if it would read as a number or true/false)"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return _shape(place.annotation)
    if kind in ("list_type", "tuple_type"):
        return "a list", "write a list: [first, second]"
    return None


def _example(place: _Place, whole: bool) -> Any:
    """A valid number for the field at `place`: its example, default, or built-in default."""
    if place.field is None or place.annotation not in (int, float):
        return None
    layer = {StageSettings: BUILTIN_DEFAULTS, LRConfig: BUILTIN_DEFAULTS.lr}
    builtin = next((v for k, v in layer.items() if place.owner and issubclass(place.owner, k)), None)
    candidates = [*(place.field.examples or []), place.field.default, getattr(builtin, place.name or "", None)]
    value = next((v for v in candidates if isinstance(v, (int, float)) and not isinstance(v, bool)), None)
    return int(value) if value is not None and whole else value


def _bounds_text(bounds: tuple[Any, ...]) -> str:
    return " and ".join(
        f"{words} {_number(getattr(bound, key))}"
        for bound in bounds
        for key, words in _BOUND_WORDS.items()
        if hasattr(bound, key)
    )


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _matching(value: Any, pattern: str) -> str:
    """The value made to match a name pattern (lowercase, other characters as '-'), or a stock name."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", str(value).lower()).strip("-_.")
    return name if re.fullmatch(pattern, name) else "astronomy-sft"


def _shape(annotation: Any) -> tuple[str, str]:
    """What a mapping-valued field takes, and how to write it: its required keys (else all its keys)."""
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return "a mapping", "write a mapping of key: value"
    if hasattr(annotation, "shape"):
        return annotation.shape, f"write {annotation.shape}"
    fields = annotation.model_fields.items()
    required = [f.alias or n for n, f in fields if f.is_required()]
    keys = (
        f"with keys {', '.join(required)}"
        if required
        else f"of keys from: {', '.join(f.alias or n for n, f in fields)}"
    )
    return "a mapping", f"write a mapping {keys}"


def _shown(value: Any) -> str:
    """A value as the YAML that produced it reads."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def _walk(loc: Loc, root: type[BaseModel]) -> _Place:
    """Follow a YAML path through the spec models to what it leads to."""
    current: Any = root
    place = _Place()
    for part in loc:
        current = unwrap_optional(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            name, field = next(((n, f) for n, f in current.model_fields.items() if part in (n, f.alias)), (None, None))
            if field is None:
                return _Place()
            place = _Place(None, name, field, current, tuple(field.metadata))
            current = field.annotation
        elif typing.get_origin(current) in (list, dict, tuple):
            current, place = typing.get_args(current)[-1], place._replace(bounds=())
        else:
            return place._replace(annotation=None)
    current = unwrap_optional(current)
    if typing.get_origin(current) is Annotated:  # constraints on dict values: dict[str, Annotated[float, Field(ge=0)]]
        current, *extra = typing.get_args(current)
        place = place._replace(bounds=place.bounds + tuple(m for info in extra for m in getattr(info, "metadata", [])))
    return place._replace(annotation=unwrap_optional(current))


def _allowed_keys(loc: Loc, root: type[BaseModel]) -> list[str]:
    model = _walk(loc, root).annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [field.alias or name for name, field in model.model_fields.items()]
    return []


def _field_doc(loc: Loc, root: type[BaseModel]) -> str | None:
    field = _walk(loc, root).field
    return " ".join(field.description.split()) if field is not None and field.description else None
