"""Semantic problems of a spec: what its parts mean together (corpora named by mixtures, files that
exist and are not empty, a writable workdir, batch arithmetic, the model's positions). A partial
pipeline's Broken parts (see load.py) skip the checks that need them."""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import fsspec

from mixloop.config.resolve import ResolvedStage, Spec, resolve_stage
from mixloop.config.schema import (
    BASE_VERSION,
    BUILTIN_DEFAULTS,
    CURRENT_ALIAS,
    FILE_FORMATS,
    MODEL_PRESETS,
    PRESET_POSITIONS,
    QWEN3_DEFAULT_POSITIONS,
    CorpusConfig,
    StageConfig,
    StageSettings,
    _as_number,
    _is_whole,
)
from mixloop.data.records import CHAT_FORMATS, TEXT_FORMATS
from mixloop.errors import MixloopError
from mixloop.evaluation.knowledge_checks import benchmark_problems
from mixloop.storage.fs import exists, expand_files, file_format, read_text, size
from mixloop.storage.hub import HUB_ID, cached_config, is_hub_id, not_cached_message, offline, split_paths

# The fields of each kind of record that `columns` may rename.
CHAT_FIELDS = ("conversations", "messages", "role", "content", "instruction", "input", "output", "system")


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


def _semantic_problems(spec: Spec, files: bool = True) -> list[str]:
    """What is wrong in the meaning of the spec's parts; a Broken part's own checks are skipped."""
    pipeline = spec.config
    problems = []
    if _ok(pipeline.tokenizer):
        problems += _tokenizer_problems(spec, files)
    if _ok(pipeline.model):
        problems += _model_problems(spec, files)
    if _ok(pipeline.chat_template) and files:
        problems += _template_problems(spec, "chat_template", pipeline.chat_template)
    if _ok(pipeline.tracking):
        problems += _tracker_problems(pipeline.tracking)
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
    if _ok(pipeline.corpora):
        problems += _gate_problems(pipeline.gate, pipeline.corpora) if _ok(pipeline.gate) and pipeline.gate else []
        problems += _iterate_problems(pipeline.iterate, pipeline.corpora) if _ok(pipeline.iterate) else []
    if _ok(pipeline.benchmarks):  # a Broken corpus has no probes to check
        problems += benchmark_problems(
            pipeline.benchmarks, spec.base_dir, _ok(pipeline.corpora) and pipeline.corpora, files=files
        )
    return problems


SHARE = re.compile(r"\d+(\.\d*)?%")


def _gate_problems(gate, corpora: dict[str, CorpusConfig]) -> list[str]:
    """Bounds that are numbers or shares ("5%"), per-corpus bounds that name corpora."""
    problems = []
    for key in ("max_forgetting", "min_uptake"):
        setting = getattr(gate, key)
        for corpus, value in setting.items() if isinstance(setting, dict) else [(None, setting)]:
            where = f"gate.{key}" + (f".{corpus}" if corpus else "")
            if corpus is not None and corpus not in corpora:
                problems.append(f"{where}: no corpus named {corpus!r}. Fix: use one of {', '.join(corpora)}.")
            if isinstance(value, str) and not SHARE.fullmatch(value):
                problems.append(
                    f"{where}: {value!r} is neither a number nor a share. Fix: write 0.05 (eval loss) "
                    'or "5%" (of the current version\'s loss).'
                )
    return problems


def _iterate_problems(iterate, corpora: dict[str, CorpusConfig]) -> list[str]:
    named = [
        ("iterate.replay_from", iterate.replay_from or [], "text"),
        ("iterate.finetune.chats", iterate.finetune.chats or [], "chat"),
    ]
    return [
        f"{where}: {name!r} is not a {kind} corpus of the spec. Fix: name one of "
        f"{', '.join(n for n, c in corpora.items() if c.kind == kind) or '(none yet)'}."
        for where, names, kind in named
        for name in names
        if name not in corpora or corpora[name].kind != kind
    ]


def _tokenizer_problems(spec: Spec, files: bool) -> list[str]:
    tok, model = spec.config.tokenizer, spec.config.model
    if tok.path is not None and tok.train is not None:
        return ["tokenizer: give one of `path` (a tokenizer directory) or `train: {vocab_size: N}`, not both."]
    if tok.path is None and tok.train is None and (not _ok(model) or model.path is None):
        return [
            "tokenizer: required unless model.path gives the model's own. Fix: add `path` (a tokenizer "
            "directory) or `train: {vocab_size: N}`."
        ]
    if files and tok.path is not None and not exists(spec.path(tok.path) + "/tokenizer.json"):
        return [
            f"tokenizer.path: no tokenizer.json in {spec.path(tok.path)}. Fix: point it at a Hugging Face tokenizer directory."
        ]
    return []


def _model_problems(spec: Spec, files: bool) -> list[str]:
    model = spec.config.model
    if model.path is not None and (model.preset or model.config):
        return ["model: `path` starts from an existing model; it cannot be combined with `preset` or `config`."]
    if model.path is None and model.preset is None and model.config is None:
        return ["model: give `preset` (one of " + ", ".join(MODEL_PRESETS) + "), `config`, or `path`."]
    if model.revision is not None and (model.path is None or not is_hub_id(model.path, spec.path(model.path))):
        return ["model.revision: only a hub id in model.path has revisions. Fix: remove it, or name a hub model."]
    if not files or model.path is None:
        return []
    if is_hub_id(model.path, spec.path(model.path)):
        return (
            ["model.path: " + not_cached_message(model.path, model.revision)]
            if offline() and not cached_config(model.path, model.revision)
            else []
        )
    if not exists(spec.path(model.path) + "/config.json"):
        return [
            f"model.path: no config.json in {spec.path(model.path)}. Fix: point it at a Hugging Face model "
            "directory, or give a hub id such as Qwen/Qwen3-0.6B."
        ]
    return []


def _defaults_problems(spec: Spec, files: bool) -> list[str]:
    pipeline, problems = spec.config, []
    for corpus in pipeline.defaults.loss_weights or {}:
        if _ok(pipeline.corpora) and corpus not in pipeline.corpora:
            problems.append(
                f"defaults.loss_weights.{corpus}: unknown corpus. Fix: use one of {', '.join(pipeline.corpora)}."
            )
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
            return [
                f"workdir: cannot create {workdir}, because {ancestor} is a file. "
                "Fix: choose a workdir whose path runs through folders only."
            ]
        # A real attempt: as root, permission bits say nothing, and /proc or read-only mounts refuse anyway.
        os.rmdir(tempfile.mkdtemp(prefix=".mixloop-write-probe-", dir=ancestor))
    except OSError as exc:
        return [
            f"workdir: cannot create {workdir}: {ancestor} is not writable ({exc.strerror or exc}). "
            "Fix: choose a workdir you may write to, or change the permissions of that folder."
        ]
    return []


def _remote_write_problems(workdir: str) -> list[str]:
    """Write and delete a probe object as the run will write (mixloop.storage.fs makes the folders first)."""
    probe = workdir.rstrip("/") + "/.mixloop-write-probe"
    try:
        fs, inner = fsspec.core.url_to_fs(probe)
        fs.makedirs(inner.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(inner, b"mixloop checks that it may write here\n")
        fs.rm_file(inner)
    except Exception as exc:  # noqa: BLE001 - permissions, credentials (botocore), network: all stop a run
        return [
            f"workdir: cannot write to {workdir} ({_first_line(exc)}). Fix: check the bucket and path, and "
            "that this machine's credentials may write there (for s3: AWS_PROFILE or AWS_ACCESS_KEY_ID; "
            "for gs: GOOGLE_APPLICATION_CREDENTIALS)."
        ]
    return []


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _corpus_problems(spec: Spec, name: str, corpus: CorpusConfig, files: bool) -> list[str]:
    where = f"corpora.{name}"
    if [corpus.path, corpus.dataset, corpus.generate].count(None) != 2:
        return [
            f"{where}: give exactly one of `path` (files), `dataset` (a Hugging Face Hub dataset id) or "
            "`generate` (mixloop writes them)."
        ]
    if corpus.dataset is None and (
        hub_only := [key for key in ("subset", "split", "revision") if getattr(corpus, key)]
    ):
        return [f"{where}.{hub_only[0]}: only a hub dataset (`dataset: org/name`) has one. Fix: remove it."]
    if corpus.generate is not None:
        return [f"{where}.eval: a generated corpus writes its own eval split; remove `eval`."] if corpus.eval else []
    problems = _record_format_problems(where, corpus)
    if corpus.chat_template is not None and corpus.kind != "chat":
        problems.append(f"{where}.chat_template: a text corpus has no chats to render. Fix: remove it.")
    if corpus.dataset is not None and not HUB_ID.match(corpus.dataset):
        problems.append(
            f"{where}.dataset: {corpus.dataset!r} is not a hub id. Fix: write it as org/name, or give "
            "local files in `path`."
        )
    if not files:
        return problems
    problems += _template_problems(spec, f"{where}.chat_template", corpus.chat_template)
    if corpus.dataset is not None:
        return problems + _dataset_problems(where, corpus)
    return problems + [
        problem
        for key in ("path", "eval")
        if getattr(corpus, key) is not None
        for problem in _corpus_file_problems(where, key, spec.path(getattr(corpus, key)), corpus.file_format)
    ]


def _dataset_problems(where: str, corpus: CorpusConfig) -> list[str]:
    """A hub dataset's splits, resolved without downloading data (offline: in the cache)."""
    for key, split in (("split", corpus.train_split), ("eval", corpus.eval)):
        try:
            paths = split_paths(corpus.dataset, corpus.revision, corpus.subset, split) if split else ()
        except MixloopError as exc:
            return [f"{where}.{key}: {exc}"]
        if corpus.file_format is None and (unread := next((p for p in paths if file_format(p) is None), None)):
            return [
                f"{where}.file_format: cannot tell the format of {unread!r} from its extension. Fix: "
                f"set file_format: one of {', '.join(FILE_FORMATS)}, if the files are one."
            ]
    return []


def _tracker_problems(tracking) -> list[str]:
    """A tracker the spec names whose client is not installed."""
    import importlib.util

    return [
        f"tracking.{name}: the {name} client is not installed. Fix: pip install 'mixloop[{name}]'."
        for name, module in (("mlflow", "mlflow"), ("wandb", "wandb"))
        if getattr(tracking, name) is not None and importlib.util.find_spec(module) is None
    ]


def _template_problems(spec: Spec, where: str, value: str | None) -> list[str]:
    if value is None or value == "chatml":
        return []
    if not exists(spec.path(value)) or not read_text(spec.path(value)).strip():
        return [f"{where}: no template in {spec.path(value)}. Fix: name a Jinja file of a chat template, or chatml."]
    return []


def _record_format_problems(where: str, corpus: CorpusConfig) -> list[str]:
    formats, fields = (TEXT_FORMATS, ("text",)) if corpus.kind == "text" else (CHAT_FORMATS, CHAT_FIELDS)
    problems = []
    if corpus.format not in formats:
        problems.append(
            f"{where}.format: {corpus.format} records are not {corpus.kind} records. Fix: use one of "
            f"{', '.join(formats)}, or kind: {'chat' if corpus.kind == 'text' else 'text'}."
        )
    for key in corpus.columns:
        if key not in fields:
            problems.append(
                f"{where}.columns.{key}: not a field of {corpus.kind} records. Fix: use "
                f"{' or '.join(fields)} (the name mixloop expects), mapped to your records' name."
            )
    return problems


def _corpus_file_problems(where: str, key: str, pattern: str, declared_format: str | None) -> list[str]:
    if "://" in pattern and (problems := _filesystem_problems(f"{where}.{key}", pattern)):
        return problems
    try:
        files = expand_files(pattern)
        empty = bool(files) and all(size(f) == 0 for f in files)
    except Exception as exc:  # noqa: BLE001 - credentials or network on object stores: report, not crash
        return [
            f"{where}.{key}: cannot list {pattern!r} ({_first_line(exc)}). Fix: check the path and that "
            "this machine's credentials may read it."
        ]
    if not files:
        return [f"{where}.{key}: no file matches {pattern!r}. Fix: check the path or glob."]
    if empty:
        return [
            f"{where}.{key}: every file matching {pattern!r} is empty ({len(files)} file(s) of 0 bytes). "
            "Fix: point it at the corpus's data, or wait until its files are written."
        ]
    if declared_format is None and any(file_format(f) is None for f in files):
        return [
            f"{where}.file_format: cannot tell the format of {files[0]!r} from its extension. "
            f"Fix: set file_format: one of {', '.join(FILE_FORMATS)}."
        ]
    return []


def stage_problems(
    spec: Spec, where: str, stage: StageConfig, earlier: list[str | None], *, files: bool = True
) -> list[str]:
    """What is wrong with `stage` (at YAML path `where`) as the next stage of the spec's pipeline.
    `spec` may be a partial pipeline: checks that need one of its Broken parts are left out."""
    corpora = spec.config.corpora
    problems = []
    if stage.name in earlier:
        problems.append(
            f"{where}.name: stage name {stage.name!r} is used twice. Fix: stage names must be unique; they name versions."
        )
    if stage.name == BASE_VERSION:
        problems.append(f"{where}.name: {BASE_VERSION!r} names the starting model. Fix: choose another stage name.")
    if stage.name == CURRENT_ALIAS:
        problems.append(
            f"{where}.name: {CURRENT_ALIAS!r} names the version in use (see `mixloop models list`). Fix: "
            "choose another stage name."
        )
    for corpus in stage.mixture if _ok(corpora) else []:
        if corpus not in corpora:
            problems.append(
                f"{where}.mixture.{corpus}: unknown corpus. Fix: use one of {', '.join(corpora)} or add it under corpora."
            )
    if stage.mixture and (
        sum(r.start for r in stage.mixture.values()) <= 0 or sum(r.end for r in stage.mixture.values()) <= 0
    ):
        problems.append(
            f"{where}.mixture: the weights add up to zero. Fix: give at least one corpus a positive weight."
        )
    if not stage.mixture:
        problems.append(f"{where}.mixture: empty. Fix: name at least one corpus with a weight.")
    problems += _resources_problems(where, stage)
    for corpus in stage.loss_weights or {}:
        if corpus not in stage.mixture:
            problems.append(
                f"{where}.loss_weights.{corpus}: not in this stage's mixture. Fix: remove it or add the corpus to the mixture."
            )
    if stage.start_from is not None and stage.start_from not in earlier + [BASE_VERSION]:
        named = ", ".join(name for name in earlier if name) or "(none)"
        problems.append(
            f"{where}.from: {stage.start_from!r} is not an earlier stage. Fix: use base or one of: {named}."
        )
    if stage.seq_len is not None:  # an inherited seq_len is checked once, at defaults.seq_len
        problems += _positions_problems(spec, f"{where}.seq_len", stage.seq_len, files)
    pipeline = spec.config
    if _ok(pipeline.defaults):  # resolving needs them; the seed only rides along, so a Broken one is replaced
        resolvable = pipeline if _ok(pipeline.seed) else pipeline.model_copy(update={"seed": 0})
        problems += _resolved_problems(where, stage, resolve_stage(resolvable, stage))
    return problems


def _resolved_problems(where: str, stage: StageConfig, resolved: ResolvedStage) -> list[str]:
    """The checks of a stage's settings once the defaults are filled in: loss weights, GPUs, batches."""
    problems, geometry = [], resolved.geometry
    if stage.mixture and not any(resolved.loss_weights[c] > 0 for c in stage.mixture):
        problems.append(
            f"{where}.loss_weights: every corpus of the stage has loss weight 0, so it would learn nothing. Fix: give one a positive weight."
        )
    if resolved.balance == "token" and any(w != 1.0 for w in resolved.loss_weights.values()):
        problems.append(
            f"{where}.loss_weights: ignored with balance: token. Fix: use balance: corpus or remove loss_weights."
        )
    if resolved.resources_per_worker.get("GPU") and not resolved.use_gpu:
        problems.append(
            f"{where}.resources_per_worker.GPU: asks for GPUs but use_gpu is false, so workers would hold "
            "GPUs and train on CPUs. Fix: set use_gpu: true (one GPU per worker; GPU here only changes the "
            "count), or name a custom resource of the GPU nodes instead."
        )
    if resolved.global_batch_tokens % resolved.seq_len or geometry.rows_per_step == 0:
        problems.append(
            f"{where}.global_batch_tokens: {resolved.global_batch_tokens} is not a multiple of seq_len {resolved.seq_len}. Fix: make it one."
        )
    elif geometry.rows_per_step % resolved.micro_batch_rows:
        problems.append(
            f"{where}.micro_batch_rows: {geometry.rows_per_step} rows per step do not split into micro-batches of {resolved.micro_batch_rows}. Fix: choose a divisor of {geometry.rows_per_step}."
        )
    elif geometry.micro_batches < resolved.max_workers:
        problems.append(
            f"{where}.workers: {resolved.max_workers} workers but only {geometry.micro_batches} micro-batches per step. Fix: fewer workers, a larger global batch or smaller micro-batches."
        )
    if resolved.min_workers > resolved.max_workers:
        problems.append(f"{where}.workers: min {resolved.min_workers} is larger than max {resolved.max_workers}.")
    if stage.tokens < resolved.global_batch_tokens:
        problems.append(
            f"{where}.tokens: {stage.tokens} is less than one step ({resolved.global_batch_tokens} tokens). Fix: raise the budget or shrink the batch."
        )
    return problems


def _positions_problems(spec: Spec, where: str, seq_len: int, files: bool) -> list[str]:
    positions = max_positions(spec, files)
    if positions is None or seq_len <= positions[0]:
        return []
    limit, source = positions
    more = (
        "start from a model with more positions"
        if source.startswith("model.path")
        else "raise model.config.max_position_embeddings"
    )
    users = " (every stage without its own seq_len, and the eval splits)" if where.startswith("defaults") else ""
    return [
        f"{where}: rows of {seq_len} tokens{users}, but the model has {limit} positions ({source}). "
        f"Fix: set seq_len to at most {limit}, or {more}."
    ]


def max_positions(spec: Spec, files: bool = True) -> tuple[int, str] | None:
    """The model's max_position_embeddings and where it comes from; None when unknown (files=False with
    model.path, an unreadable config.json, a Broken model section)."""
    model = spec.config.model
    if not _ok(model):
        return None
    if model.path is not None:
        config = (
            cached_config(model.path, model.revision)
            if is_hub_id(model.path, spec.path(model.path))
            else spec.path(model.path) + "/config.json"
        )
        value = _config_positions(config) if files and config else None
        return (value, "model.path's config.json") if value else None
    value = _as_number((model.config or {}).get("max_position_embeddings"))
    if _is_whole(value):
        return int(value), "model.config.max_position_embeddings"
    if model.preset in PRESET_POSITIONS:
        return PRESET_POSITIONS[model.preset], f"max_position_embeddings of preset {model.preset}"
    return QWEN3_DEFAULT_POSITIONS, "Qwen3Config's default max_position_embeddings"


@functools.lru_cache(maxsize=64)
def _config_positions(config_path: str) -> int | None:
    """max_position_embeddings (n_positions for GPT-2-like models) of a model's config.json, read as
    JSON so that validating needs no transformers."""
    try:
        config = json.loads(read_text(config_path))
    except Exception:  # noqa: BLE001 - a missing or unreadable config is the model checks' business
        return None
    value = _as_number(next((config[k] for k in ("max_position_embeddings", "n_positions") if k in config), None))
    return int(value) if _is_whole(value) else None


def _resources_problems(where: str, settings: StageSettings) -> list[str]:
    problems = []
    for key, amount in (settings.resources_per_worker or {}).items():
        if key.upper() == "CPU":
            problems.append(
                f"{where}.resources_per_worker.{key}: the CPUs of a worker are not set here. "
                f"Fix: remove {key} and set cpus_per_worker: {amount:g} instead."
            )
        elif key.upper() in ("GPU", "TPU") and key != key.upper():
            problems.append(
                f"{where}.resources_per_worker.{key}: Ray's resource names are case-sensitive, and no node "
                f"has {key!r}. Fix: write {key.upper()}."
            )
    return problems
