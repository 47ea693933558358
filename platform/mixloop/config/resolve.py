"""A spec's paths and stages resolved: every setting of a stage filled in from the defaults, and the
stage's content hash."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mixloop.config.benchmarks import PROBE_KEYWORDS, portable_benchmarks
from mixloop.config.schema import BUILTIN_DEFAULTS, LRConfig, PipelineConfig, StageConfig, StageSettings
from mixloop.storage.fs import read_text
from mixloop.storage.hub import is_hub_id, local_model


def path_keys(section: dict[str, Any]) -> list[str]:
    """The keys of a tokenizer or corpus section (as data) that hold file paths; a hub dataset's `eval`
    names one of its splits, and `probes: eval` or `generated` no file."""
    named = ("dataset" in section) * ["eval"] + (section.get("probes") in PROBE_KEYWORDS) * ["probes"]  # no files
    return [key for key in ("path", "eval", "probes") if key in section and key not in named]


class Spec:
    """A pipeline spec as loaded: its validated `config` (the YAML's models), the folder its relative
    paths start from, and the KEY.PATH=VALUE overrides applied over the file."""

    def __init__(self, config: PipelineConfig, base_dir: str):
        self.config = config
        self.base_dir = base_dir
        self.overrides: list[str] = []  # KEY.PATH=VALUE applied over the file (kept in lineage)

    def path(self, value: str) -> str:
        """Resolve a spec path: URIs and absolute paths stay, others start at the spec's folder."""
        if "://" in value or Path(value).is_absolute():
            return value
        return str((Path(self.base_dir) / value).resolve())

    @property
    def workdir(self) -> str:
        return self.path(self.config.workdir)

    def chat_template(self, value: str | None) -> str | None:
        """The text of a chat_template setting: the built-in chatml, or a Jinja file's."""
        if value is None:
            return None
        if value == "chatml":
            # lazy: transformers, which validating a spec does without
            from mixloop.data.tokenizer import CHATML_TEMPLATE

            return CHATML_TEMPLATE
        return read_text(self.path(value))

    def model_folder(self) -> tuple[str, str | None]:
        """(local folder, hub commit or None) of model.path, downloaded first when it is a hub id."""
        path = self._model_path()
        return local_model(path, self.path(path), self.config.model.revision)

    def model_source(self) -> str:
        """model.path as the workdir records it: a hub id as it is, a folder made absolute."""
        path = self._model_path()
        return path if is_hub_id(path, self.path(path)) else self.path(path)

    def _model_path(self) -> str:
        if self.config.model.path is None:  # callers ask only for a model that has a path
            raise ValueError("the spec's model has no path: a preset or a config makes it")
        return self.config.model.path

    def portable(self) -> dict[str, Any]:
        """The spec as data with every path absolute, valid wherever it is written (the workdir's copy)."""
        data = self.config.model_dump(mode="json", by_alias=True, exclude_none=True)
        data["workdir"] = self.workdir
        for section in (data["tokenizer"], *data["corpora"].values()):
            for key in path_keys(section):
                section[key] = self.path(section[key])
        if "benchmarks" in data:
            data["benchmarks"] = portable_benchmarks(data["benchmarks"], self.path)
        if "path" in data["model"]:
            data["model"]["path"] = self.model_source()  # a hub id stays one
        for holder in (data, *data["corpora"].values()):  # template files, as for corpora
            if holder.get("chat_template") not in (None, "chatml"):
                holder["chat_template"] = self.path(holder["chat_template"])
        return data

    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.config.stages]

    def resolved_stages(self) -> list[ResolvedStage]:
        return [resolve_stage(self.config, stage) for stage in self.config.stages]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Share(Frozen):
    """A corpus's normalised weight at the start and at the end of a stage (linear in between)."""

    start: float = Field(alias="from")
    end: float = Field(alias="to")


class ResolvedLR(Frozen):
    peak: float
    warmup: float
    warmup_from: Literal["current", "zero"]
    decay: Literal["cosine", "linear", "wsd", "constant"]
    floor: float
    wsd_decay: float


@dataclass(frozen=True)
class StepGeometry:
    """The arithmetic of a stage's batches: the one place that turns tokens into rows and steps."""

    seq_len: int
    global_batch_tokens: int
    micro_batch_rows: int

    @property
    def rows_per_step(self) -> int:
        return self.global_batch_tokens // self.seq_len

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step, shared out over the workers."""
        return self.rows_per_step // self.micro_batch_rows

    def steps_for(self, tokens: int) -> int:
        """Steps that train a token budget, rounded up to whole steps."""
        return math.ceil(tokens / self.global_batch_tokens)

    def whole_steps_within(self, tokens: int) -> int:
        """The most whole steps that stay within `tokens`."""
        return tokens // self.global_batch_tokens

    def tokens_for(self, steps: int) -> int:
        return steps * self.global_batch_tokens


class ResolvedStage(Frozen):
    """A stage with every setting filled in (stage, then defaults, then BUILTIN_DEFAULTS): what the
    driver plans with and every worker trains by. It crosses to Ray Train's workers as JSON
    (`as_json`) and is validated back on the other side; versions keep that JSON in lineage.json."""

    name: str
    tokens: int
    start_from: str | None
    seed: int
    mixture: dict[str, Share]
    seq_len: int
    packing: bool
    global_batch_tokens: int
    micro_batch_rows: int
    lr: ResolvedLR
    loss_weights: dict[str, float]
    balance: Literal["corpus", "token"]
    weight_decay: float
    grad_clip: float
    checkpoint_every: int
    log_every: int
    min_workers: int
    max_workers: int
    resize_every_s: float
    cpus_per_worker: float
    use_gpu: bool
    resources_per_worker: dict[str, float]
    max_failures: int
    max_repeats: float
    nonfinite: Literal["stop", "skip"]

    @property
    def geometry(self) -> StepGeometry:
        return StepGeometry(self.seq_len, self.global_batch_tokens, self.micro_batch_rows)

    @property
    def total_steps(self) -> int:
        return self.geometry.steps_for(self.tokens)

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def resolve_stage(pipeline: PipelineConfig, stage: StageConfig) -> ResolvedStage:
    """The stage with every setting filled in."""
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
        for key in LRConfig.model_fields
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
    return ResolvedStage.model_validate(settings)


# The settings that decide what a stage trains: its rows, their order and the updates. The others
# (workers, CPUs, GPU and other resources per worker, micro-batch size, logging and checkpoint intervals,
# restarts) may change between runs, so a finished stage stays finished and an unfinished one resumes on
# another machine.
TRAJECTORY_FIELDS = (
    "mixture",
    "tokens",
    "seq_len",
    "packing",
    "global_batch_tokens",
    "lr",
    "loss_weights",
    "balance",
    "weight_decay",
    "grad_clip",
    "seed",
    "start_from",
)


def stage_hash(resolved_stage: ResolvedStage, parent_hash: str) -> str:
    """Content hash of a stage: the settings that decide its training, and what it starts from."""
    settings = resolved_stage.as_json()
    trajectory = {key: settings[key] for key in TRAJECTORY_FIELDS if key in settings}
    if trajectory.get("packing", True):  # packed rows were the only kind before the option: same hashes
        trajectory.pop("packing", None)
    return _content_hash(trajectory, parent_hash)


def base_hash(seed: int, tokenizer_fingerprint: str) -> str:
    """The hash of version `base`, which every stage hash chains from: the seed over the tokenizer.
    (The model it starts from is compared through the `model` record of base's lineage instead, so
    the hashes of existing workdirs stay as they were.)"""
    return _content_hash({"seed": seed}, tokenizer_fingerprint)


def _content_hash(trajectory: dict[str, Any], parent_hash: str) -> str:
    payload = json.dumps({"stage": trajectory, "parent": parent_hash}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
