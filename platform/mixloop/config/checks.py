"""Semantic problems of a spec: what its parts mean together (corpora named by mixtures, batch
arithmetic, the model's positions; corpora, their files and the workdir are checked in data_checks).
A partial pipeline's Broken parts (see load.py) skip the checks that need them."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from collections.abc import Sequence
from typing import Any

from mixloop.config.benchmarks import BenchmarksConfig
from mixloop.config.data_checks import corpus_problems, template_problems, workdir_problems
from mixloop.config.resolve import ResolvedStage, Spec, resolve_stage
from mixloop.config.schema import (
    BASE_VERSION,
    BUILTIN_DEFAULTS,
    CURRENT_ALIAS,
    GateConfig,
    IterateConfig,
    StageConfig,
    StageSettings,
    TrackingConfig,
)
from mixloop.config.sources import MODEL_PRESETS, PRESET_POSITIONS, QWEN3_DEFAULT_POSITIONS, CorpusConfig
from mixloop.config.strict import as_number, is_whole
from mixloop.evaluation.knowledge_checks import benchmark_problems
from mixloop.storage.fs import exists, read_text
from mixloop.storage.hub import cached_config, is_hub_id, not_cached_message, offline


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
        problems += template_problems(spec, "chat_template", pipeline.chat_template)
    if _ok(pipeline.tracking):
        problems += _tracker_problems(pipeline.tracking)
    if _ok(pipeline.workdir) and files:
        problems += workdir_problems(spec.workdir)
    for name, corpus in pipeline.corpora.items() if _ok(pipeline.corpora) else []:
        problems += corpus_problems(spec, name, corpus, files) if _ok(corpus) else []
    if _ok(pipeline.defaults):
        problems += _defaults_problems(spec, files)
    seen: list[str | None] = []
    for index, stage in enumerate(pipeline.stages if _ok(pipeline.stages) else []):
        problems += stage_problems(spec, f"stages[{index}]", stage, seen, files=files) if _ok(stage) else []
        seen.append(stage.name)
    if _ok(pipeline.corpora):
        problems += _gate_problems(pipeline.gate, pipeline.corpora) if _ok(pipeline.gate) and pipeline.gate else []
        if _ok(pipeline.gate) and pipeline.gate and _ok(pipeline.benchmarks):
            problems += _score_bound_problems(pipeline.gate, pipeline.benchmarks, pipeline.corpora)
        problems += _iterate_problems(pipeline.iterate, pipeline.corpora) if _ok(pipeline.iterate) else []
    if _ok(pipeline.benchmarks):  # a Broken corpus has no probes to check
        problems += benchmark_problems(
            pipeline.benchmarks, spec.base_dir, pipeline.corpora if _ok(pipeline.corpora) else None, files=files
        )
    return problems


SHARE = re.compile(r"\d+(\.\d*)?%")


def _gate_problems(gate: GateConfig, corpora: dict[str, CorpusConfig]) -> list[str]:
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


def _score_bound_problems(
    gate: GateConfig, benchmarks: BenchmarksConfig | None, corpora: dict[str, CorpusConfig]
) -> list[str]:
    """Score bounds that name what the spec scores: a probe, a corpus with probes, or a named task. With
    named lm-eval tasks, a bound may also name one of a group's subtasks, which only lm-eval knows."""
    scored = {*(benchmarks.probes if benchmarks else {}), *(n for n, c in corpora.items() if c.probes)}
    tasks = set(benchmarks.tasks) if benchmarks else set()
    drops = gate.max_score_drop if isinstance(gate.max_score_drop, dict) else {}
    named = [("min_score", n) for n in gate.min_score or {}] + [("max_score_drop", n) for n in drops]
    return [
        f"gate.{key}.{name}: the spec scores no benchmark task or probe named {name!r}. Fix: use one of "
        f"{', '.join(sorted(scored | tasks)) or '(none: add a benchmarks section or a corpus with probes)'}."
        for key, name in named
        if name not in scored | tasks and not tasks
    ]


def _iterate_problems(iterate: IterateConfig, corpora: dict[str, CorpusConfig]) -> list[str]:
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


def _tracker_problems(tracking: TrackingConfig) -> list[str]:
    """A tracker the spec names whose client is not installed."""
    return [
        f"tracking.{name}: the {name} client is not installed. Fix: pip install 'mixloop[{name}]'."
        for name, module in (("mlflow", "mlflow"), ("wandb", "wandb"))
        if getattr(tracking, name) is not None and importlib.util.find_spec(module) is None
    ]


def stage_problems(
    spec: Spec, where: str, stage: StageConfig, earlier: Sequence[str | None], *, files: bool = True
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
    if stage.start_from is not None and stage.start_from not in [*earlier, BASE_VERSION]:
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


def _positions_problems(spec: Spec, where: str, seq_len: int | None, files: bool) -> list[str]:
    positions = max_positions(spec, files)
    if positions is None or seq_len is None or seq_len <= positions[0]:
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
    value = as_number((model.config or {}).get("max_position_embeddings"))
    if is_whole(value):
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
    value = as_number(next((config[k] for k in ("max_position_embeddings", "n_positions") if k in config), None))
    return int(value) if is_whole(value) else None


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
