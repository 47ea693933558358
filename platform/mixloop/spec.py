"""The pipeline spec: one YAML file, validated strictly before any Ray work.

Structure is checked by pydantic (unknown keys are errors), meaning by
``_semantic_problems``; every problem is reported at once with its YAML path and
a fix. Stages inherit unset settings from ``defaults``, which inherit from
``BUILTIN_DEFAULTS``; ``resolve_stage`` produces the complete, plain stage that
workers receive as JSON.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mixloop.errors import SpecError
from mixloop.storage import exists, read_text

MODEL_PRESETS = ("minimind-3", "small", "tiny", "micro")
GENERATED_TOPICS = ("general", "astronomy")
STAGE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
BASE_VERSION = "base"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, populate_by_name=True)


class TrainTokenizer(Strict):
    vocab_size: int = Field(ge=260, le=262144)
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
        return {"min": value, "max": value} if isinstance(value, int) else value


class Ramp(Strict):
    start: float = Field(alias="from", ge=0)
    """Weight at the start of the stage."""
    end: float = Field(alias="to", ge=0)
    """Weight at the end of the stage (linear in between)."""

    @model_validator(mode="before")
    @classmethod
    def _from_number(cls, value: Any) -> Any:
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
    tokens: int = Field(gt=0)
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


def load_spec(path: str | Path) -> Spec:
    """Read and validate a pipeline YAML (a path or a URI); raise SpecError listing every problem."""
    remote = "://" in str(path)
    pipeline = validate_yaml(path, PipelineSpec, "pipeline", "jobs/")
    # A remote spec is a workdir's own copy, whose paths are all absolute.
    spec = Spec(pipeline, str(path).rsplit("/", 1)[0] if remote else str(Path(path).resolve().parent))
    problems = _semantic_problems(spec)
    if problems:
        raise SpecError(format_problems(path, problems))
    return spec


def validate_yaml(path: str | Path, model: type[BaseModel], what: str, examples: str) -> Any:
    """A YAML file (path or URI) read into `model`; SpecError naming the YAML path of every problem."""
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
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(error, model) for error in exc.errors()]
        raise SpecError(format_problems(path, problems, what)) from None


def format_problems(path: str | Path, problems: list[str], what: str = "pipeline") -> str:
    lines = [f"{path}: {len(problems)} problem(s) in the {what} spec:"]
    lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)


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
    if kind == "missing":
        doc = _field_doc(loc, root)
        return f"{where}: required but missing. Fix: add it{f' ({doc})' if doc else ''}."
    return f"{where}: {error['msg']} (got {error.get('input')!r}). Fix: {_field_doc(loc, root) or 'correct the value'}."


def _walk(loc: tuple, root: type[BaseModel]) -> tuple[type | None, str | None]:
    """Follow a YAML path through the spec models: the model class there and the last field's doc."""
    current: Any = root
    doc = None
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) or next(
                (f for f in current.model_fields.values() if f.alias == part), None
            )
            if field is None:
                return None, None
            current, doc = field.annotation, field.description
        elif typing.get_origin(current) in (list, dict):
            current = typing.get_args(current)[-1]
        else:
            return None, doc
    return _unwrap(current), doc


def _unwrap(annotation: Any) -> Any:
    """Optional[X] -> X, so walking sees the model inside."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, type(int | None)) and len(args) == 1:
        return args[0]
    return annotation


def _allowed_keys(loc: tuple, root: type[BaseModel]) -> list[str]:
    model, _ = _walk(loc, root)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [field.alias or name for name, field in model.model_fields.items()]
    return []


def _field_doc(loc: tuple, root: type[BaseModel]) -> str | None:
    _, doc = _walk(loc, root)
    return " ".join(doc.split()) if doc else None


# ---------------------------------------------------------------- semantic checks


def _semantic_problems(spec: Spec) -> list[str]:
    pipeline = spec.pipeline
    problems = _tokenizer_problems(spec) + _model_problems(spec)
    if "://" in pipeline.workdir:
        problems += _filesystem_problems("workdir", pipeline.workdir)
    for name, corpus in pipeline.corpora.items():
        problems += _corpus_problems(spec, name, corpus)
    for corpus in pipeline.defaults.loss_weights or {}:
        if corpus not in pipeline.corpora:
            problems.append(f"defaults.loss_weights.{corpus}: unknown corpus. Fix: use one of {', '.join(pipeline.corpora)}.")
    problems += _resources_problems("defaults", pipeline.defaults)
    seen: list[str] = []
    for index, stage in enumerate(pipeline.stages):
        problems += stage_problems(spec, f"stages[{index}]", stage, seen)
        seen.append(stage.name)
    return problems


def _tokenizer_problems(spec: Spec) -> list[str]:
    tok = spec.pipeline.tokenizer
    if (tok.path is None) == (tok.train is None):
        return ["tokenizer: give exactly one of `path` (a tokenizer directory) or `train: {vocab_size: N}`."]
    if tok.path is not None and not _exists(spec.path(tok.path) + "/tokenizer.json"):
        return [f"tokenizer.path: no tokenizer.json in {spec.path(tok.path)}. Fix: point it at a Hugging Face tokenizer directory."]
    return []


def _model_problems(spec: Spec) -> list[str]:
    model = spec.pipeline.model
    if model.path is not None and (model.preset or model.config):
        return ["model: `path` starts from an existing model; it cannot be combined with `preset` or `config`."]
    if model.path is None and model.preset is None and model.config is None:
        return ["model: give `preset` (one of " + ", ".join(MODEL_PRESETS) + "), `config`, or `path`."]
    if model.path is not None and not _exists(spec.path(model.path) + "/config.json"):
        return [f"model.path: no config.json in {spec.path(model.path)}. Fix: point it at a Hugging Face model directory."]
    return []


def _filesystem_problems(where: str, uri: str) -> list[str]:
    protocol = uri.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        extra = {"s3": "mixloop[s3]", "gs": "mixloop[gcs]", "gcs": "mixloop[gcs]"}.get(protocol)
        fix = f"pip install '{extra}'" if extra else "install the fsspec implementation for it"
        return [f"{where}: cannot use {protocol}:// here ({str(exc).splitlines()[0]}). Fix: {fix}."]
    return []


def _corpus_problems(spec: Spec, name: str, corpus: CorpusSpec) -> list[str]:
    where = f"corpora.{name}"
    if (corpus.path is None) == (corpus.generate is None):
        return [f"{where}: give exactly one of `path` (files) or `generate` (mixloop writes them)."]
    if corpus.generate is not None:
        return [f"{where}.eval: a generated corpus writes its own eval split; remove `eval`."] if corpus.eval else []
    problems = []
    for key in ("path", "eval"):
        pattern = getattr(corpus, key)
        if pattern is None:
            continue
        files = expand_files(spec.path(pattern))
        if not files:
            problems.append(f"{where}.{key}: no file matches {spec.path(pattern)!r}. Fix: check the path or glob.")
        elif corpus.format is None and any(file_format(f) is None for f in files):
            problems.append(f"{where}.format: cannot tell the format of {files[0]!r} from its extension. Fix: set format: jsonl or parquet.")
    return problems


def stage_problems(spec: Spec, where: str, stage: StageSpec, earlier: list[str]) -> list[str]:
    """What is wrong with `stage` (at YAML path `where`) as the next stage of the spec's pipeline."""
    corpora = spec.pipeline.corpora
    problems = []
    if stage.name in earlier:
        problems.append(f"{where}.name: stage name {stage.name!r} is used twice. Fix: stage names must be unique; they name versions.")
    if stage.name == BASE_VERSION:
        problems.append(f"{where}.name: {BASE_VERSION!r} names the starting model. Fix: choose another stage name.")
    for corpus in stage.mixture:
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
    resolved = resolve_stage(spec.pipeline, stage)
    if stage.mixture and not any(resolved["loss_weights"][c] > 0 for c in stage.mixture):
        problems.append(f"{where}.loss_weights: every corpus of the stage has loss weight 0, so it would learn nothing. Fix: give one a positive weight.")
    if resolved["balance"] == "token" and any(w != 1.0 for w in resolved["loss_weights"].values()):
        problems.append(f"{where}.loss_weights: ignored with balance: token. Fix: use balance: corpus or remove loss_weights.")
    if resolved["resources_per_worker"].get("GPU") and not resolved["use_gpu"]:
        problems.append(f"{where}.resources_per_worker.GPU: asks for GPUs but use_gpu is false, so workers would hold "
                        "GPUs and train on CPUs. Fix: set use_gpu: true (one GPU per worker; GPU here only changes the "
                        "count), or name a custom resource of the GPU nodes instead.")
    if stage.start_from is not None and stage.start_from not in earlier + [BASE_VERSION]:
        problems.append(f"{where}.from: {stage.start_from!r} is not an earlier stage. Fix: use base or one of: {', '.join(earlier) or '(none)'}.")
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
