"""Reading a spec: YAML to a validated Spec, with every problem (structural and semantic) at once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticUndefined

from mixloop.errors import SpecError
from mixloop.spec.checks import Broken, _semantic_problems
from mixloop.spec.messages import _describe, format_problems
from mixloop.spec.resolve import Spec
from mixloop.spec.schema import CorpusSpec, PipelineSpec, StageSpec, _numbers_where_numeric
from mixloop.storage import exists, read_text

def load_spec(path: str | Path, *, files: bool = True) -> Spec:
    """Read and validate a pipeline YAML (a path or a URI); raise SpecError listing every problem.

    files=False checks the spec alone: nothing is read from (or written to) files, folders or fsspec."""
    data = read_yaml(path, PipelineSpec, "pipeline", "jobs/")
    # A remote spec is a workdir's own copy, whose paths are all absolute.
    base_dir = str(path).rsplit("/", 1)[0] if "://" in str(path) else str(Path(path).resolve().parent)
    spec, problems = _checked_spec(data, base_dir, files)
    if problems:
        raise SpecError(format_problems(path, problems))
    return spec


def check_spec_data(data: dict, base_dir: str, files: bool = True) -> list[str]:
    """Every problem of a pipeline spec given as data, structural and semantic, without raising.
    Relative paths start at base_dir; files=False leaves out the checks that read files or folders."""
    return _checked_spec(data, base_dir, files)[1]


def _checked_spec(data: dict, base_dir: str, files: bool) -> tuple[Spec, list[str]]:
    """The spec and all its problems. After a structural error, the semantic checks run on a partial
    pipeline made of the parts that validate on their own (see _partial_pipeline)."""
    try:
        pipeline, problems = PipelineSpec.model_validate(data), []
    except ValidationError as exc:
        problems = [_describe(error, PipelineSpec) for error in exc.errors()]
        pipeline = _partial_pipeline(data)
    spec = Spec(pipeline, base_dir)
    return spec, problems + _semantic_problems(spec, files)


def read_yaml(path: str | Path, model: type[BaseModel], what: str, examples: str) -> dict:
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


def _partial_pipeline(data: dict) -> PipelineSpec:
    """A PipelineSpec built, unvalidated as a whole, from the parts of `data` that validate alone:
    each top-level field, each corpus and each stage; any other part is Broken."""
    parts: dict[str, Any] = {}
    for name, field in PipelineSpec.model_fields.items():
        value = data.get(field.alias or name, PydanticUndefined)
        if name == "corpora" and isinstance(value, dict):
            parts[name] = {str(key): _validated(CorpusSpec, item) for key, item in value.items()}
        elif name == "stages" and isinstance(value, list):
            parts[name] = [_validated(StageSpec, item) for item in value]
        elif value is PydanticUndefined:
            parts[name] = Broken() if field.is_required() else field.get_default(call_default_factory=True)
        else:
            parts[name] = _validated(Annotated[field.annotation, field], _numbers_where_numeric(value, field.annotation))
    return PipelineSpec.model_construct(**parts)


def _validated(kind: Any, value: Any) -> Any:
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError:
        name = value.get("name") if isinstance(value, dict) else None
        return Broken(name if isinstance(name, str) else None)
