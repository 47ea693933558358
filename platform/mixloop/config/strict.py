"""Strict, the base of every model of the spec: unknown keys are errors, each field is documented
where it is declared, and numbers in exponent notation (2e9) read as numbers."""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

# A number in exponent notation. YAML 1.1 (PyYAML) reads 2e9, 2.0e9 and 1e-3 as strings: it wants a dot
# and a signed exponent (2.0e+9). Numeric fields take them as numbers; the YAML itself is left alone,
# so a name such as 1e5 stays a string when a spec is dumped and read again.
EXPONENT_NUMBER = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+")


def as_number(value: Any) -> Any:
    """A string in exponent notation as its float (2e9 -> 2000000000.0); anything else as it is."""
    return float(value) if isinstance(value, str) and EXPONENT_NUMBER.fullmatch(value.strip()) else value


def is_whole(value: Any) -> bool:
    """An int, or a float without a fractional part (2e9 in YAML), as a count may be written."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def unwrap_optional(annotation: Any) -> Any:
    """Optional[X] -> X, so walking sees the model inside."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, type(int | None)) and len(args) == 1:
        return args[0]
    return annotation


def numbers_where_numeric(value: Any, annotation: Any) -> Any:
    """`value` with exponent strings turned into numbers wherever `annotation` wants an int or a float
    (also inside lists, tuples and dict values); an int field then takes a whole float as its int."""
    annotation = unwrap_optional(annotation)
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation in (int, float):
        return as_number(value)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple) and isinstance(value, list) and args:
        kinds = args if origin is tuple and args[-1] is not Ellipsis else [args[0]] * len(value)
        return [numbers_where_numeric(item, kind) for item, kind in zip(value, kinds)] + value[len(kinds) :]
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return {key: numbers_where_numeric(item, args[1]) for key, item in value.items()}
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _exponent_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return numbers_where_numeric(value, cls.model_fields[info.field_name or ""].annotation)
