"""A spec's paths and stages resolved: every setting of a stage filled in from the defaults, and the
stage's content hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mixloop.spec.schema import BUILTIN_DEFAULTS, LRSpec, PipelineSpec, StageSettings, StageSpec

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
