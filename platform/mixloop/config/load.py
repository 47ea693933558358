"""Reading a spec: YAML to a validated Spec, with every problem (structural and semantic) at once."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticUndefined

from mixloop.config.checks import Broken, _semantic_problems
from mixloop.config.messages import _describe, format_problems
from mixloop.config.resolve import Spec
from mixloop.config.schema import PipelineConfig, StageConfig
from mixloop.config.sources import CorpusConfig
from mixloop.config.strict import numbers_where_numeric
from mixloop.errors import SpecError
from mixloop.storage.fs import exists, read_text


def load_spec(path: str | Path, overrides: Sequence[str] = (), *, files: bool = True) -> Spec:
    """Read and validate a pipeline YAML (a path or a URI), with `overrides` (KEY.PATH=VALUE, see
    apply_overrides) applied first; raise SpecError listing every problem.

    files=False checks the spec alone: nothing is read from (or written to) files, folders or fsspec."""
    data = read_yaml(path, PipelineConfig, "pipeline", "jobs/")
    # A remote spec is a workdir's own copy, whose paths are all absolute.
    base_dir = str(path).rsplit("/", 1)[0] if "://" in str(path) else str(Path(path).resolve().parent)
    return spec_from_data(data, base_dir, overrides, files=files, source=str(path))


def spec_from_data(
    data: dict[str, Any],
    base_dir: str = ".",
    overrides: Sequence[str] = (),
    *,
    files: bool = True,
    source: str = "spec",
) -> Spec:
    """A validated Spec from data shaped like the YAML (relative paths start at `base_dir`); SpecError
    naming `source` and listing every problem."""
    data, problems = apply_overrides(data, overrides)
    spec, more = _checked_spec(data, base_dir, files)
    if problems or more:
        raise SpecError(format_problems(source, problems + more))
    spec.overrides = list(overrides)
    return spec


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """A copy of `data` with each `KEY.PATH=VALUE` set (VALUE read as YAML; a list item as `stages[1]`
    or, in stages, by name: `stages.sft.tokens=2e5`), and a problem for each one that names no place."""
    data, problems = copy.deepcopy(data), []
    for override in overrides:
        path, sep, raw = override.partition("=")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = None
        keys = [int(part) if part.isdigit() else part for part in re.split(r"\.|\[(\d+)\]\.?", path) if part]
        if not sep or not keys or (value is None and raw.strip() not in ("null", "~", "")):
            problems.append(
                f"{override!r}: not an override. Fix: write KEY.PATH=VALUE, e.g. stages[0].tokens=2e5 "
                "or defaults.lr.peak=0.002."
            )
            continue
        problems += _set(data, keys, value, override)
    return data, problems


def _set(data: dict[str, Any], keys: list[int | str], value: Any, override: str) -> list[str]:
    if keys[0] == "stages" and len(keys) > 2 and isinstance(keys[1], str) and isinstance(data.get("stages"), list):
        names = {stage.get("name"): index for index, stage in enumerate(data["stages"]) if isinstance(stage, dict)}
        if keys[1] not in names:
            return [f"{override!r}: no stage named {keys[1]!r}. Fix: use one of {', '.join(map(str, names))}."]
        keys[1] = names[keys[1]]
    node: Any = data  # any YAML value on the way: a mapping, a list, or what the override cannot enter
    for depth, key in enumerate(keys[:-1]):
        try:
            node = node[key] if isinstance(node, list) and isinstance(key, int) else node.setdefault(key, {})
        except (IndexError, TypeError, AttributeError):
            return [f"{override!r}: {'.'.join(map(str, keys[: depth + 1]))} holds no {key!r}. Fix: check the key path."]
    try:
        node[keys[-1]] = value
    except (IndexError, TypeError):
        return [f"{override!r}: cannot set {keys[-1]!r} there. Fix: check the key path."]
    return []


def check_spec_data(data: dict[str, Any], base_dir: str, files: bool = True) -> list[str]:
    """Every problem of a pipeline spec given as data, structural and semantic, without raising.
    Relative paths start at base_dir; files=False leaves out the checks that read files or folders."""
    return _checked_spec(data, base_dir, files)[1]


def _checked_spec(data: dict[str, Any], base_dir: str, files: bool) -> tuple[Spec, list[str]]:
    """The spec and all its problems. After a structural error, the semantic checks run on a partial
    pipeline made of the parts that validate on their own (see _partial_pipeline)."""
    try:
        pipeline, problems = PipelineConfig.model_validate(data), []
    except ValidationError as exc:
        problems = [_describe(error, PipelineConfig) for error in exc.errors()]
        pipeline = _partial_pipeline(data)
    spec = Spec(pipeline, base_dir)
    return spec, problems + _semantic_problems(spec, files)


def read_yaml(path: str | Path, model: type[BaseModel], what: str, examples: str) -> dict[str, Any]:
    """The mapping in a YAML file (path or URI); SpecError when there is no such file or no mapping."""
    remote = "://" in str(path)
    if not (exists(str(path)) if remote else Path(path).is_file()):
        raise SpecError(f"{path}: no such spec file. Fix: pass the path of a {what} YAML (see {examples}).")
    try:
        data = yaml.safe_load(read_text(str(path)))
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        keys = ", ".join(f.alias or n for n, f in model.model_fields.items() if f.is_required())
        raise SpecError(f"{path}: the spec must be a mapping with keys {keys}.")
    return data


def validate_yaml(path: str | Path, model: type[BaseModel], what: str, examples: str) -> Any:
    """A YAML file (path or URI) read into `model`; SpecError naming the YAML path of every problem."""
    data = read_yaml(path, model, what, examples)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(error, model) for error in exc.errors()]
        raise SpecError(format_problems(path, problems, what)) from None


def _partial_pipeline(data: dict[str, Any]) -> PipelineConfig:
    """A PipelineConfig built, unvalidated as a whole, from the parts of `data` that validate alone:
    each top-level field, each corpus and each stage; any other part is Broken."""
    parts: dict[str, Any] = {}
    for name, field in PipelineConfig.model_fields.items():
        value = data.get(field.alias or name, PydanticUndefined)
        if name == "corpora" and isinstance(value, dict):
            parts[name] = {str(key): _validated(CorpusConfig, item) for key, item in value.items()}
        elif name == "stages" and isinstance(value, list):
            parts[name] = [_validated(StageConfig, item) for item in value]
        elif value is PydanticUndefined:
            parts[name] = Broken() if field.is_required() else field.get_default(call_default_factory=True)
        else:
            parts[name] = _validated(Annotated[field.annotation, field], numbers_where_numeric(value, field.annotation))
    return PipelineConfig.model_construct(**parts)


def _validated(kind: Any, value: Any) -> Any:
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError:
        name = value.get("name") if isinstance(value, dict) else None
        return Broken(name if isinstance(name, str) else None)
