"""The pipeline spec: one YAML file, validated strictly before any Ray work.

Structure is checked by pydantic (unknown keys are errors), meaning by
``_semantic_problems``; every problem is reported at once with its YAML path and
a fix. When the structure is wrong, the parts that validate on their own (the
tokenizer, the model, each corpus, the defaults, each stage) still get their
semantic checks, so one run of ``mixloop validate`` lists everything it can.
Stages inherit unset settings from ``defaults``, which inherit from
``BUILTIN_DEFAULTS``; ``resolve_stage`` produces the complete, plain stage that
workers receive as JSON.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import re
import tempfile
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined

from mixloop.errors import SpecError
from mixloop.storage import exists, read_text

MODEL_PRESETS = ("minimind-3", "small", "tiny", "micro")
GENERATED_TOPICS = ("general", "astronomy")
STAGE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
BASE_VERSION = "base"
# max_position_embeddings of mixloop.model.PRESETS, and Qwen3Config's default for a preset or config without
# one. Copied so that validating a spec does not import torch and transformers (seconds); a unit test keeps
# them in step.
PRESET_POSITIONS = {"minimind-3": 32768, "small": 4096, "tiny": 2048, "micro": 2048}
QWEN3_DEFAULT_POSITIONS = 32768


# A number in exponent notation. YAML 1.1 (PyYAML) reads 2e9, 2.0e9 and 1e-3 as strings: it wants a dot
# and a signed exponent (2.0e+9). Numeric fields take them as numbers; the YAML itself is left alone,
# so a name such as 1e5 stays a string when a spec is dumped and read again.
EXPONENT_NUMBER = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+")


def _as_number(value: Any) -> Any:
    """A string in exponent notation as its float (2e9 -> 2000000000.0); anything else as it is."""
    return float(value) if isinstance(value, str) and EXPONENT_NUMBER.fullmatch(value.strip()) else value


def _is_whole(value: Any) -> bool:
    """An int, or a float without a fractional part (2e9 in YAML), as a count may be written."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def _unwrap(annotation: Any) -> Any:
    """Optional[X] -> X, so walking sees the model inside."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, type(int | None)) and len(args) == 1:
        return args[0]
    return annotation


def _numbers_where_numeric(value: Any, annotation: Any) -> Any:
    """`value` with exponent strings turned into numbers wherever `annotation` wants an int or a float
    (also inside lists, tuples and dict values); an int field then takes a whole float as its int."""
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation in (int, float):
        return _as_number(value)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple) and isinstance(value, list) and args:
        kinds = args if origin is tuple and args[-1] is not Ellipsis else [args[0]] * len(value)
        return [_numbers_where_numeric(item, kind) for item, kind in zip(value, kinds)] + value[len(kinds):]
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return {key: _numbers_where_numeric(item, args[1]) for key, item in value.items()}
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _exponent_numbers(cls, value: Any, info) -> Any:
        return _numbers_where_numeric(value, cls.model_fields[info.field_name].annotation)


class TrainTokenizer(Strict):
    vocab_size: int = Field(ge=260, le=262144, examples=[6400])
    """Size of the byte-level BPE vocabulary, special tokens included."""
    sample_bytes: int = Field(default=50_000_000, gt=0)
    """At most this many bytes of the pipeline's corpora are read to train it."""


class TokenizerSpec(Strict):
    path: str | None = None
    """A Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json)."""
    train: TrainTokenizer | None = None
    """Train a byte-level BPE with a ChatML chat template on the pipeline's corpora."""


class ModelSpec(Strict):
    preset: Literal[MODEL_PRESETS] | None = None  # type: ignore[valid-type]
    """A named Qwen3 configuration: minimind-3, small, tiny or micro."""
    config: dict[str, Any] | None = None
    """Qwen3Config fields, applied over the preset if one is given."""
    path: str | None = None
    """An existing Hugging Face causal-LM directory to start from."""
    trust_remote_code: bool = False
    """Allow code shipped inside a model directory to run. Off unless you trust it."""


class Generate(Strict):
    topic: Literal[GENERATED_TOPICS]  # type: ignore[valid-type]
    """What the generated documents are about: general or astronomy."""
    documents: int = Field(default=2000, gt=0)
    """How many training documents to generate."""
    eval_documents: int = Field(default=100, gt=0)
    """How many held-out documents to generate for the eval split."""
    seed: int = 0
    """Seed of the generator: the same seed writes the same files."""


class CorpusSpec(Strict):
    kind: Literal["text", "chat"]
    """text rows are {"text": ...} and train on every token; chat rows are
    {"conversations": [...]} and train on assistant tokens only."""
    path: str | None = None
    """A path, glob or fsspec URI (s3://...) of jsonl or parquet files."""
    format: Literal["jsonl", "parquet"] | None = None
    """File format; taken from the file extension when not given."""
    eval: str | None = None
    """A held-out split in the same format, used to measure uptake and forgetting."""
    generate: Generate | None = None
    """Let mixloop generate this corpus (used by the quickstart; nothing to download)."""
    max_bad_fraction: float = Field(default=0.01, ge=0, le=1)
    """Stop when more than this share of records is malformed (they go to rejects/)."""
    max_document_tokens: int | None = Field(default=None, gt=0)
    """Longest document, in tokens, taken whole; longer ones are handled as `long_documents` says."""
    long_documents: Literal["split", "drop"] = "split"
    """split: cut a document longer than max_document_tokens into pieces trained as separate
    documents (counted in the manifest); drop: write it to rejects/ with its length."""


class LRSpec(Strict):
    peak: float | None = Field(default=None, gt=0)
    """Peak learning rate, reached at the end of warmup."""
    warmup: float | None = Field(default=None, ge=0, lt=1)
    """Share of the stage's steps spent warming up to the peak."""
    warmup_from: Literal["current", "zero"] | None = None
    """current: re-warm from the parent version's final learning rate; zero: from 0."""
    decay: Literal["cosine", "linear", "wsd", "constant"] | None = None
    """Shape after warmup. wsd holds the peak, then decays linearly over the last `wsd_decay` share."""
    floor: float | None = Field(default=None, ge=0, le=1)
    """Learning rate at the end of the stage, as a fraction of the peak."""
    wsd_decay: float | None = Field(default=None, gt=0, le=1)
    """For decay: wsd, the share of the stage's steps spent decaying."""


class Workers(Strict):
    shape: ClassVar[str] = "a whole number or {min: N, max: N}"
    min: int = Field(ge=1)
    """Fewest workers the stage runs with."""
    max: int = Field(ge=1)
    """Most workers the stage runs with (elastic when larger than min)."""
    resize_every_s: float = Field(default=60.0, gt=0)
    """For an elastic stage, how often to check whether more workers fit the cluster (a grow is a
    restart from the latest checkpoint, so not too often)."""

    @model_validator(mode="before")
    @classmethod
    def _from_int(cls, value: Any) -> Any:
        value = _as_number(value)
        return {"min": value, "max": value} if _is_whole(value) else value


class Ramp(Strict):
    shape: ClassVar[str] = "a weight or {from: W, to: W}"
    start: float = Field(alias="from", ge=0)
    """Weight at the start of the stage."""
    end: float = Field(alias="to", ge=0)
    """Weight at the end of the stage (linear in between)."""

    @model_validator(mode="before")
    @classmethod
    def _from_number(cls, value: Any) -> Any:
        value = _as_number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"from": value, "to": value}
        return value


class StageSettings(Strict):
    seq_len: int | None = Field(default=None, ge=8)
    """Tokens per packed row."""
    packing: bool | None = None
    """true: pack documents into full rows; false: one document per row, padded (slower: the
    padding costs compute and trains nothing)."""
    global_batch_tokens: int | None = Field(default=None, gt=0)
    """Tokens per optimizer step, whatever the number of workers (a multiple of seq_len)."""
    micro_batch_rows: int | None = Field(default=None, gt=0)
    """Rows per forward pass on one worker; gradient accumulation makes up the rest."""
    lr: LRSpec = Field(default_factory=LRSpec)
    """Learning-rate schedule; unset fields come from defaults."""
    loss_weights: dict[str, Annotated[float, Field(ge=0)]] | None = None
    """Corpus name to a factor on its share of the loss (default 1; balance: corpus only)."""
    balance: Literal["corpus", "token"] | None = None
    """corpus: average the loss within each corpus, then weight by its share of rows;
    token: a plain mean over supervised tokens."""
    weight_decay: float | None = Field(default=None, ge=0)
    """AdamW weight decay."""
    grad_clip: float | None = Field(default=None, gt=0)
    """Clip the gradient norm to this value."""
    checkpoint_every: int | None = Field(default=None, gt=0)
    """Write a checkpoint every this many optimizer steps."""
    log_every: int | None = Field(default=None, gt=0)
    """Report metrics every this many optimizer steps."""
    workers: Workers | None = None
    """Number of training workers: an integer, or {min, max} for elastic training."""
    cpus_per_worker: float | None = Field(default=None, gt=0)
    """CPUs reserved per worker; leave some for Ray Data on small machines."""
    use_gpu: bool | None = None
    """Train on one GPU per worker (NCCL, bf16 autocast)."""
    resources_per_worker: dict[str, Annotated[float, Field(gt=0)]] | None = None
    """Ray resources each worker asks for besides its CPUs: a custom resource that the nodes to train
    on declare, e.g. {"accelerator_type:A10G": 0.001}, or {GPU: 2} with use_gpu: true for two GPUs
    per worker. Not CPU: cpus_per_worker sets that."""
    max_failures: int | None = Field(default=None, ge=0)
    """Worker-group restarts allowed before the stage fails."""
    max_repeats: float | None = Field(default=None, gt=0)
    """Warn when the stage passes over a corpus more than this many times: repeating data beyond
    about 4 passes adds little (arXiv 2305.16264). Add data or lower the corpus's weight."""
    nonfinite: Literal["stop", "skip"] | None = None
    """On a non-finite loss or gradient: stop with an error (the last checkpoint stays), or skip
    the step (counted in the metrics as skipped_steps)."""


class StageTemplate(StageSettings):
    """A stage without its name and start: what a tuning search varies."""

    mixture: dict[str, Ramp]
    """Corpus name to weight (share of trained tokens), or {from, to} to ramp it linearly over the
    stage. Weights are normalised to sum 1 at every point, so ramp the other corpora too when a
    share should end at an exact value."""
    tokens: int = Field(gt=0, examples=[160_000])
    """Token budget of the stage (rounded up to whole optimizer steps)."""


class StageSpec(StageTemplate):
    name: str = Field(pattern=STAGE_NAME_PATTERN)
    """Stage name, which is also the name of the version it produces."""
    start_from: str | None = Field(default=None, alias="from")
    """Version to start from; default: the previous stage's version (or base)."""


class PipelineSpec(Strict):
    name: str = Field(pattern=STAGE_NAME_PATTERN)
    """Pipeline name; also names the Ray Train runs."""
    workdir: str
    """Run directory (path relative to this file, or an fsspec URI)."""
    seed: int = 0
    """Seed for model init, the mix plan and shuffling."""
    tokenizer: TokenizerSpec
    """Where the tokenizer comes from."""
    model: ModelSpec
    """The architecture, or the model to start from."""
    corpora: dict[str, CorpusSpec]
    """Named sources of documents."""
    defaults: StageSettings = Field(default_factory=StageSettings)
    """Settings every stage inherits unless it sets its own."""
    stages: list[StageSpec] = Field(min_length=1)
    """The ordered stages of the model's life."""
    eval_rows: int = Field(default=64, gt=0)
    """Packed rows of each eval split used to evaluate a version (at the defaults' seq_len)."""
    chat_prompts: int = Field(default=8, ge=0)
    """Prompts of each chat eval split answered greedily by every version to measure chat health."""
    chat_max_new_tokens: int = Field(default=64, gt=0)
    """Longest answer generated for chat health; an answer that has not ended by then did not end."""


BUILTIN_DEFAULTS = StageSettings(
    seq_len=256,
    packing=True,
    global_batch_tokens=16384,
    micro_batch_rows=8,
    lr=LRSpec(peak=1e-3, warmup=0.05, warmup_from="current", decay="cosine", floor=0.1, wsd_decay=0.2),
    loss_weights={},
    balance="corpus",
    weight_decay=0.1,
    grad_clip=1.0,
    checkpoint_every=50,
    log_every=10,
    workers=Workers(min=1, max=1),
    cpus_per_worker=1.0,
    use_gpu=False,
    resources_per_worker={},
    max_failures=2,
    max_repeats=4.0,
    nonfinite="stop",
)


class Spec:
    """A validated pipeline spec and the folder its relative paths start from."""

    def __init__(self, pipeline: PipelineSpec, base_dir: str):
        self.pipeline = pipeline
        self.base_dir = base_dir

    def path(self, value: str) -> str:
        """Resolve a spec path: URIs and absolute paths stay, others start at the spec's folder."""
        if "://" in value or Path(value).is_absolute():
            return value
        return str((Path(self.base_dir) / value).resolve())

    @property
    def workdir(self) -> str:
        return self.path(self.pipeline.workdir)

    def portable(self) -> dict:
        """The spec as data with every path absolute, valid wherever it is written (the workdir's copy)."""
        data = self.pipeline.model_dump(mode="json", by_alias=True, exclude_none=True)
        data["workdir"] = self.workdir
        for section in (data["tokenizer"], data["model"], *data["corpora"].values()):
            for key in ("path", "eval"):
                if key in section:
                    section[key] = self.path(section[key])
        return data

    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.pipeline.stages]

    def resolved_stages(self) -> list[dict]:
        return [resolve_stage(self.pipeline, stage) for stage in self.pipeline.stages]


def resolve_stage(pipeline: PipelineSpec, stage: StageSpec) -> dict:
    """The stage with every setting filled in, as plain JSON-able data."""
    layers = [BUILTIN_DEFAULTS, pipeline.defaults, stage]
    settings: dict[str, Any] = {}
    for field in StageSettings.model_fields:
        if field == "lr":
            continue
        for layer in layers:
            value = getattr(layer, field)
            if value is not None:
                settings[field] = value
    settings["lr"] = {
        key: next(getattr(layer.lr, key) for layer in reversed(layers) if getattr(layer.lr, key) is not None)
        for key in LRSpec.model_fields
    }
    workers = settings.pop("workers")
    settings.update(min_workers=workers.min, max_workers=workers.max, resize_every_s=workers.resize_every_s)
    total = sum(ramp.start for ramp in stage.mixture.values()) or 1.0
    total_end = sum(ramp.end for ramp in stage.mixture.values()) or 1.0
    settings["mixture"] = {
        name: {"from": ramp.start / total, "to": ramp.end / total_end} for name, ramp in stage.mixture.items()
    }
    settings["loss_weights"] = {name: settings["loss_weights"].get(name, 1.0) for name in stage.mixture}
    settings.update(name=stage.name, tokens=stage.tokens, start_from=stage.start_from, seed=pipeline.seed)
    return json.loads(json.dumps(settings))


# The settings that decide what a stage trains: its rows, their order and the updates. The others
# (workers, CPUs, GPU and other resources per worker, micro-batch size, logging and checkpoint intervals,
# restarts) may change between runs, so a finished stage stays finished and an unfinished one resumes on
# another machine.
TRAJECTORY_FIELDS = ("mixture", "tokens", "seq_len", "packing", "global_batch_tokens", "lr", "loss_weights",
                     "balance", "weight_decay", "grad_clip", "seed", "start_from")


def stage_hash(resolved_stage: dict, parent_hash: str) -> str:
    """Content hash of a stage: the settings that decide its training, and what it starts from."""
    trajectory = {key: resolved_stage[key] for key in TRAJECTORY_FIELDS if key in resolved_stage}
    if trajectory.get("packing", True):  # packed rows were the only kind before the option: same hashes
        trajectory.pop("packing", None)
    payload = json.dumps({"stage": trajectory, "parent": parent_hash}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading


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


def format_problems(path: str | Path, problems: list[str], what: str = "pipeline") -> str:
    lines = [f"{path}: {len(problems)} problem(s) in the {what} spec:"]
    lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)


# ---------------------------------------------------------------- partial pipelines


class Broken:
    """Stands in a partial pipeline for a part that did not validate. It keeps the part's name (a
    corpus's key, a stage's `name`) so that checks needing only names still see it, while checks
    needing the part itself skip it rather than report what only follows from the first error."""

    def __init__(self, name: str | None = None):
        self.name = name

    def __repr__(self) -> str:
        return f"Broken({self.name!r})"


def _ok(part: Any) -> bool:
    return not isinstance(part, Broken)


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


# ---------------------------------------------------------------- describing structural errors


class _Place(typing.NamedTuple):
    """What a YAML path leads to in the spec models."""

    annotation: Any = None  # the type of the value there (Optional unwrapped)
    name: str | None = None  # the last model field on the way, its FieldInfo and its model
    field: Any = None
    owner: type | None = None
    bounds: tuple = ()  # annotated_types constraints on the value: Gt, Ge, Lt, Le


def _yaml_path(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _describe(error: dict, root: type[BaseModel]) -> str:
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
_BOUND_WORDS = {"gt": "greater than", "ge": "greater than or equal to", "lt": "less than", "le": "less than or equal to"}
_BOUND_ERRORS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}
# The patterns of the spec models in words.
_PATTERN_WORDS = {STAGE_NAME_PATTERN: "a name of lowercase letters, digits, '_', '.' and '-'"}


def _expected(error: dict, place: _Place) -> tuple[str, str] | None:
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
    layer = {StageSettings: BUILTIN_DEFAULTS, LRSpec: BUILTIN_DEFAULTS.lr}
    builtin = next((v for k, v in layer.items() if place.owner and issubclass(place.owner, k)), None)
    candidates = [*(place.field.examples or []), place.field.default, getattr(builtin, place.name or "", None)]
    value = next((v for v in candidates if isinstance(v, (int, float)) and not isinstance(v, bool)), None)
    return int(value) if value is not None and whole else value


def _bounds_text(bounds: tuple) -> str:
    return " and ".join(f"{words} {_number(getattr(bound, key))}" for bound in bounds
                        for key, words in _BOUND_WORDS.items() if hasattr(bound, key))


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
    keys = f"with keys {', '.join(required)}" if required else f"of keys from: {', '.join(f.alias or n for n, f in fields)}"
    return "a mapping", f"write a mapping {keys}"


def _shown(value: Any) -> str:
    """A value as the YAML that produced it reads."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def _walk(loc: tuple, root: type[BaseModel]) -> _Place:
    """Follow a YAML path through the spec models to what it leads to."""
    current: Any = root
    place = _Place()
    for part in loc:
        current = _unwrap(current)
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
    current = _unwrap(current)
    if typing.get_origin(current) is Annotated:  # constraints on dict values: dict[str, Annotated[float, Field(ge=0)]]
        current, *extra = typing.get_args(current)
        place = place._replace(bounds=place.bounds + tuple(m for info in extra for m in getattr(info, "metadata", [])))
    return place._replace(annotation=_unwrap(current))


def _allowed_keys(loc: tuple, root: type[BaseModel]) -> list[str]:
    model = _walk(loc, root).annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [field.alias or name for name, field in model.model_fields.items()]
    return []


def _field_doc(loc: tuple, root: type[BaseModel]) -> str | None:
    field = _walk(loc, root).field
    return " ".join(field.description.split()) if field is not None and field.description else None


# ---------------------------------------------------------------- semantic checks


def _semantic_problems(spec: Spec, files: bool = True) -> list[str]:
    """What is wrong in the meaning of the spec's parts; a Broken part's own checks are skipped."""
    pipeline = spec.pipeline
    problems = []
    if _ok(pipeline.tokenizer):
        problems += _tokenizer_problems(spec, files)
    if _ok(pipeline.model):
        problems += _model_problems(spec, files)
    if _ok(pipeline.workdir) and files:
        problems += workdir_problems(spec.workdir)
    for name, corpus in pipeline.corpora.items() if _ok(pipeline.corpora) else []:
        problems += _corpus_problems(spec, name, corpus, files) if _ok(corpus) else []
    if _ok(pipeline.defaults):
        problems += _defaults_problems(spec, files)
    seen: list[str | None] = []
    for index, stage in enumerate(pipeline.stages if _ok(pipeline.stages) else []):
        problems += stage_problems(spec, f"stages[{index}]", stage, seen, files=files) if _ok(stage) else []
        seen.append(stage.name)
    return problems


def _tokenizer_problems(spec: Spec, files: bool) -> list[str]:
    tok = spec.pipeline.tokenizer
    if (tok.path is None) == (tok.train is None):
        return ["tokenizer: give exactly one of `path` (a tokenizer directory) or `train: {vocab_size: N}`."]
    if files and tok.path is not None and not _exists(spec.path(tok.path) + "/tokenizer.json"):
        return [f"tokenizer.path: no tokenizer.json in {spec.path(tok.path)}. Fix: point it at a Hugging Face tokenizer directory."]
    return []


def _model_problems(spec: Spec, files: bool) -> list[str]:
    model = spec.pipeline.model
    if model.path is not None and (model.preset or model.config):
        return ["model: `path` starts from an existing model; it cannot be combined with `preset` or `config`."]
    if model.path is None and model.preset is None and model.config is None:
        return ["model: give `preset` (one of " + ", ".join(MODEL_PRESETS) + "), `config`, or `path`."]
    if files and model.path is not None and not _exists(spec.path(model.path) + "/config.json"):
        return [f"model.path: no config.json in {spec.path(model.path)}. Fix: point it at a Hugging Face model directory."]
    return []


def _defaults_problems(spec: Spec, files: bool) -> list[str]:
    pipeline, problems = spec.pipeline, []
    for corpus in pipeline.defaults.loss_weights or {}:
        if _ok(pipeline.corpora) and corpus not in pipeline.corpora:
            problems.append(f"defaults.loss_weights.{corpus}: unknown corpus. Fix: use one of {', '.join(pipeline.corpora)}.")
    problems += _resources_problems("defaults", pipeline.defaults)
    # Eval splits are packed at the defaults' seq_len, and every stage without its own inherits it.
    seq_len = pipeline.defaults.seq_len or BUILTIN_DEFAULTS.seq_len
    return problems + _positions_problems(spec, "defaults.seq_len", seq_len, files)


def _filesystem_problems(where: str, uri: str) -> list[str]:
    protocol = uri.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        extra = {"s3": "mixloop[s3]", "gs": "mixloop[gcs]", "gcs": "mixloop[gcs]"}.get(protocol)
        fix = f"pip install '{extra}'" if extra else "install the fsspec implementation for it"
        return [f"{where}: cannot use {protocol}:// here ({str(exc).splitlines()[0]}). Fix: {fix}."]
    return []


def workdir_problems(workdir: str) -> list[str]:
    """Whether a run could create `workdir` (a local path or an fsspec URI) and write in it."""
    if "://" in workdir:
        return _filesystem_problems("workdir", workdir) or _remote_write_problems(workdir)
    return _local_write_problems(Path(workdir))


def _local_write_problems(workdir: Path) -> list[str]:
    # The nearest existing folder on the way: the run creates the rest of the path from there.
    ancestor = workdir
    try:  # exists() raises when a folder on the way may not be searched
        if workdir.exists() and not workdir.is_dir():
            return [f"workdir: {workdir} is a file. Fix: point workdir at a folder, or move the file away."]
        ancestor = next(p for p in (workdir, *workdir.parents) if p.exists())
        if not ancestor.is_dir():
            return [f"workdir: cannot create {workdir}, because {ancestor} is a file. "
                    "Fix: choose a workdir whose path runs through folders only."]
        # A real attempt: as root, permission bits say nothing, and /proc or read-only mounts refuse anyway.
        os.rmdir(tempfile.mkdtemp(prefix=".mixloop-write-probe-", dir=ancestor))
    except OSError as exc:
        return [f"workdir: cannot create {workdir}: {ancestor} is not writable ({exc.strerror or exc}). "
                "Fix: choose a workdir you may write to, or change the permissions of that folder."]
    return []


def _remote_write_problems(workdir: str) -> list[str]:
    """Write and delete a probe object as the run will write (mixloop.storage makes the folders first)."""
    probe = workdir.rstrip("/") + "/.mixloop-write-probe"
    try:
        fs, inner = fsspec.core.url_to_fs(probe)
        fs.makedirs(inner.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(inner, b"mixloop checks that it may write here\n")
        fs.rm_file(inner)
    except Exception as exc:  # noqa: BLE001 - permissions, credentials (botocore), network: all stop a run
        return [f"workdir: cannot write to {workdir} ({_first_line(exc)}). Fix: check the bucket and path, and "
                "that this machine's credentials may write there (for s3: AWS_PROFILE or AWS_ACCESS_KEY_ID; "
                "for gs: GOOGLE_APPLICATION_CREDENTIALS)."]
    return []


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _corpus_problems(spec: Spec, name: str, corpus: CorpusSpec, files: bool) -> list[str]:
    where = f"corpora.{name}"
    if (corpus.path is None) == (corpus.generate is None):
        return [f"{where}: give exactly one of `path` (files) or `generate` (mixloop writes them)."]
    if corpus.generate is not None:
        return [f"{where}.eval: a generated corpus writes its own eval split; remove `eval`."] if corpus.eval else []
    if not files:
        return []
    return [problem for key in ("path", "eval") if getattr(corpus, key) is not None
            for problem in _corpus_file_problems(where, key, spec.path(getattr(corpus, key)), corpus.format)]


def _corpus_file_problems(where: str, key: str, pattern: str, declared_format: str | None) -> list[str]:
    if "://" in pattern and (problems := _filesystem_problems(f"{where}.{key}", pattern)):
        return problems
    try:
        files = expand_files(pattern)
        empty = bool(files) and all(_size(f) == 0 for f in files)
    except Exception as exc:  # noqa: BLE001 - credentials or network on object stores: report, not crash
        return [f"{where}.{key}: cannot list {pattern!r} ({_first_line(exc)}). Fix: check the path and that "
                "this machine's credentials may read it."]
    if not files:
        return [f"{where}.{key}: no file matches {pattern!r}. Fix: check the path or glob."]
    if empty:
        return [f"{where}.{key}: every file matching {pattern!r} is empty ({len(files)} file(s) of 0 bytes). "
                "Fix: point it at the corpus's data, or wait until its files are written."]
    if declared_format is None and any(file_format(f) is None for f in files):
        return [f"{where}.format: cannot tell the format of {files[0]!r} from its extension. Fix: set format: jsonl or parquet."]
    return []


def stage_problems(spec: Spec, where: str, stage: StageSpec, earlier: list[str | None], *,
                   files: bool = True) -> list[str]:
    """What is wrong with `stage` (at YAML path `where`) as the next stage of the spec's pipeline.
    `spec` may be a partial pipeline: checks that need one of its Broken parts are left out."""
    corpora = spec.pipeline.corpora
    problems = []
    if stage.name in earlier:
        problems.append(f"{where}.name: stage name {stage.name!r} is used twice. Fix: stage names must be unique; they name versions.")
    if stage.name == BASE_VERSION:
        problems.append(f"{where}.name: {BASE_VERSION!r} names the starting model. Fix: choose another stage name.")
    for corpus in stage.mixture if _ok(corpora) else []:
        if corpus not in corpora:
            problems.append(f"{where}.mixture.{corpus}: unknown corpus. Fix: use one of {', '.join(corpora)} or add it under corpora.")
    if stage.mixture and (sum(r.start for r in stage.mixture.values()) <= 0 or sum(r.end for r in stage.mixture.values()) <= 0):
        problems.append(f"{where}.mixture: the weights add up to zero. Fix: give at least one corpus a positive weight.")
    if not stage.mixture:
        problems.append(f"{where}.mixture: empty. Fix: name at least one corpus with a weight.")
    problems += _resources_problems(where, stage)
    for corpus in stage.loss_weights or {}:
        if corpus not in stage.mixture:
            problems.append(f"{where}.loss_weights.{corpus}: not in this stage's mixture. Fix: remove it or add the corpus to the mixture.")
    if stage.start_from is not None and stage.start_from not in earlier + [BASE_VERSION]:
        named = ", ".join(name for name in earlier if name) or "(none)"
        problems.append(f"{where}.from: {stage.start_from!r} is not an earlier stage. Fix: use base or one of: {named}.")
    if stage.seq_len is not None:  # an inherited seq_len is checked once, at defaults.seq_len
        problems += _positions_problems(spec, f"{where}.seq_len", stage.seq_len, files)
    pipeline = spec.pipeline
    if _ok(pipeline.defaults):  # resolving needs them; the seed only rides along, so a Broken one is replaced
        resolvable = pipeline if _ok(pipeline.seed) else pipeline.model_copy(update={"seed": 0})
        problems += _resolved_problems(where, stage, resolve_stage(resolvable, stage))
    return problems


def _resolved_problems(where: str, stage: StageSpec, resolved: dict) -> list[str]:
    """The checks of a stage's settings once the defaults are filled in: loss weights, GPUs, batches."""
    problems = []
    if stage.mixture and not any(resolved["loss_weights"][c] > 0 for c in stage.mixture):
        problems.append(f"{where}.loss_weights: every corpus of the stage has loss weight 0, so it would learn nothing. Fix: give one a positive weight.")
    if resolved["balance"] == "token" and any(w != 1.0 for w in resolved["loss_weights"].values()):
        problems.append(f"{where}.loss_weights: ignored with balance: token. Fix: use balance: corpus or remove loss_weights.")
    if resolved["resources_per_worker"].get("GPU") and not resolved["use_gpu"]:
        problems.append(f"{where}.resources_per_worker.GPU: asks for GPUs but use_gpu is false, so workers would hold "
                        "GPUs and train on CPUs. Fix: set use_gpu: true (one GPU per worker; GPU here only changes the "
                        "count), or name a custom resource of the GPU nodes instead.")
    rows_per_step, rem = divmod(resolved["global_batch_tokens"], resolved["seq_len"])
    if rem or rows_per_step == 0:
        problems.append(f"{where}.global_batch_tokens: {resolved['global_batch_tokens']} is not a multiple of seq_len {resolved['seq_len']}. Fix: make it one.")
    elif rows_per_step % resolved["micro_batch_rows"]:
        problems.append(f"{where}.micro_batch_rows: {rows_per_step} rows per step do not split into micro-batches of {resolved['micro_batch_rows']}. Fix: choose a divisor of {rows_per_step}.")
    elif rows_per_step // resolved["micro_batch_rows"] < resolved["max_workers"]:
        problems.append(f"{where}.workers: {resolved['max_workers']} workers but only {rows_per_step // resolved['micro_batch_rows']} micro-batches per step. Fix: fewer workers, a larger global batch or smaller micro-batches.")
    if resolved["min_workers"] > resolved["max_workers"]:
        problems.append(f"{where}.workers: min {resolved['min_workers']} is larger than max {resolved['max_workers']}.")
    if stage.tokens < resolved["global_batch_tokens"]:
        problems.append(f"{where}.tokens: {stage.tokens} is less than one step ({resolved['global_batch_tokens']} tokens). Fix: raise the budget or shrink the batch.")
    return problems


def _positions_problems(spec: Spec, where: str, seq_len: int, files: bool) -> list[str]:
    positions = max_positions(spec, files)
    if positions is None or seq_len <= positions[0]:
        return []
    limit, source = positions
    more = ("start from a model with more positions" if source.startswith("model.path")
            else "raise model.config.max_position_embeddings")
    users = " (every stage without its own seq_len, and the eval splits)" if where.startswith("defaults") else ""
    return [f"{where}: rows of {seq_len} tokens{users}, but the model has {limit} positions ({source}). "
            f"Fix: set seq_len to at most {limit}, or {more}."]


def max_positions(spec: Spec, files: bool = True) -> tuple[int, str] | None:
    """The model's max_position_embeddings and where it comes from; None when unknown (files=False with
    model.path, an unreadable config.json, a Broken model section)."""
    model = spec.pipeline.model
    if not _ok(model):
        return None
    if model.path is not None:
        value = _config_positions(spec.path(model.path)) if files else None
        return (value, "model.path's config.json") if value else None
    value = _as_number((model.config or {}).get("max_position_embeddings"))
    if _is_whole(value):
        return int(value), "model.config.max_position_embeddings"
    if model.preset in PRESET_POSITIONS:
        return PRESET_POSITIONS[model.preset], f"max_position_embeddings of preset {model.preset}"
    return QWEN3_DEFAULT_POSITIONS, "Qwen3Config's default max_position_embeddings"


@functools.lru_cache(maxsize=64)
def _config_positions(folder: str) -> int | None:
    """max_position_embeddings (n_positions for GPT-2-like models) of a model directory's config.json,
    read as JSON so that validating needs no transformers."""
    try:
        config = json.loads(read_text(folder.rstrip("/") + "/config.json"))
    except Exception:  # noqa: BLE001 - a missing or unreadable config is the model checks' business
        return None
    value = _as_number(next((config[k] for k in ("max_position_embeddings", "n_positions") if k in config), None))
    return int(value) if _is_whole(value) else None


def _resources_problems(where: str, settings: StageSettings) -> list[str]:
    problems = []
    for key, amount in (settings.resources_per_worker or {}).items():
        if key.upper() == "CPU":
            problems.append(f"{where}.resources_per_worker.{key}: the CPUs of a worker are not set here. "
                            f"Fix: remove {key} and set cpus_per_worker: {amount:g} instead.")
        elif key.upper() in ("GPU", "TPU") and key != key.upper():
            problems.append(f"{where}.resources_per_worker.{key}: Ray's resource names are case-sensitive, and no node "
                            f"has {key!r}. Fix: write {key.upper()}.")
    return problems


# ---------------------------------------------------------------- files


def expand_files(pattern: str) -> list[str]:
    """Files matching a path, glob or URI, sorted, as URIs/paths usable by fsspec."""
    fs, _ = fsspec.core.url_to_fs(pattern)
    try:
        matches = fs.expand_path(pattern.split("://", 1)[-1] if "://" in pattern else pattern, recursive=False)
    except FileNotFoundError:
        return []
    files = sorted(m for m in matches if fs.isfile(m))
    protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    return [protocol + f if protocol and not f.startswith(protocol) else f for f in files]


def file_format(path: str) -> str | None:
    name = path.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def _exists(path: str) -> bool:
    fs, inner = fsspec.core.url_to_fs(path)
    return fs.exists(inner)


def _size(path: str) -> int:
    fs, inner = fsspec.core.url_to_fs(path)
    return fs.size(inner) or 0
