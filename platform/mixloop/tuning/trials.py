"""A `mixloop tune` trial: what every trial shares (TrialContext, computed once by the search's
driver), the StageJob it trains, and the function Ray Tune runs as the trial. A trial of one worker
trains in its Tune trial's own process (train.session.TuneTrial); one of several workers is a Ray
Train run of its own, whose intermediate evals ReportObjectives forwards to Tune."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from mixloop.data.corpora import PreparedCorpora
from mixloop.storage.fs import append_line, exists, read_json, write_json, write_text
from mixloop.storage.layout import SearchFolder
from mixloop.train.job import StageJob, stage_job
from mixloop.train.launch import fit_stages
from mixloop.train.loop import run_stages
from mixloop.train.session import TuneTrial
from mixloop.train.step import StepHooks
from mixloop.tuning.objectives import objective_keys, objective_value
from mixloop.tuning.search import Search
from mixloop.versioning.lineage import Lineage
from mixloop.versioning.registry import version_dir


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs, computed once by the search's driver."""

    search: Search
    folder: SearchFolder
    prepared: PreparedCorpora
    corpus_dirs: dict[str, str]  # packed train splits of every corpus a trial may mix
    parent: Lineage  # of the start version
    eval_dirs: dict[str, str]
    eval_rows: int
    start_losses: dict[str, float]
    workers: int
    cpus_per_worker: float

    @property
    def in_trial(self) -> bool:
        """Trials of one worker train in their Tune trial's own process (train.session.TuneTrial)."""
        return self.workers == 1

    def job(self, stage: dict, trial_id: str) -> StageJob:
        """The StageJob of a trial: the stage on the trials' workers, with intermediate evals at its
        checkpoints (neither changes what the stage trains), its files in trials/<trial_id>/."""
        folder = self.folder.trial(trial_id)
        resolved = self.search.resolve(stage)
        evals_every = math.ceil(resolved.total_steps / self.search.config.trials.evals)
        trial = resolved.model_copy(
            update={
                "min_workers": self.workers,
                "max_workers": self.workers,
                "cpus_per_worker": self.cpus_per_worker,
                "checkpoint_every": evals_every,
            }
        )
        spec = self.search.spec
        return stage_job(
            spec.config.name,
            trial,
            self.parent.metrics.final_lr,
            version_dir(spec.workdir, self.parent.version),
            self.corpus_dirs,
            folder.metrics,
            spec.config.model.trust_remote_code,
            evals=self.eval_dirs,
            eval_rows=self.eval_rows,
            progress_lines=False,
            run=trial_id,
            final_dir=folder.final,
        )


def run_trial(config: dict, context: TrialContext) -> None:
    """Ray Tune's function trainable: train the trial's stage, reporting its intermediate evals, then
    its final row. One worker trains here, in the trial's process; several, on a Ray Train group."""
    trial_id = tune.get_context().get_trial_id()
    folder = context.folder.trial(trial_id)
    append_line(folder.starts, json.dumps({"time": time.time()}))
    if exists(folder.result):  # it finished before the search was interrupted (written when it trained to the end)
        tune.report(read_json(folder.result))
        return
    stage = context.search.trial_stage(config)
    write_text(folder.stage, yaml.safe_dump(stage, sort_keys=False))
    job = context.job(stage, trial_id)
    every = job.stage.checkpoint_every

    def row(metrics: dict) -> dict:
        return objective_row(metrics, context.search.objectives, context.start_losses, every)

    clock = time.time()
    final = _train_here(job, row) if context.in_trial else _train_on_group(job, context, trial_id, row)
    # The final eval is reported here, also when a resumed run had nothing left to train.
    final_row = {**row(final), "wall_s": round(time.time() - clock, 1)}
    write_json(folder.result, final_row)
    tune.report(final_row)


def _train_here(job: StageJob, row: Callable[[dict], dict]) -> dict:
    """Train a one-worker trial in this process: its final metrics."""
    session = TuneTrial(row, job.stage.use_gpu)
    run_stages([job], session, StepHooks())
    if session.last is None:  # a stage reports at its last step
        raise RuntimeError(f"trial stage {job.stage.name} ended without a report")
    return session.last


def _train_on_group(job: StageJob, context: TrialContext, trial_id: str, row: Callable[[dict], dict]) -> dict:
    """Train a trial on a Ray Train worker group of its own: its final metrics."""
    callback = ReportObjectives(row)
    metrics = fit_stages([job], context.folder.train, trial_id, callbacks=[callback]).metrics
    if metrics is None:  # a stage reports at its last step
        raise RuntimeError(f"trial stage {job.stage.name} ended without a report")
    return metrics


def objective_row(metrics: dict, objectives: list[str], start_losses: dict[str, float], checkpoint_every: int) -> dict:
    """What a trial reports to Tune at an eval: its objectives, eval losses, forgetting and progress
    (`eval` counts evals by step, so a repeated or extra report does not advance ASHA's rungs)."""
    losses = metrics["eval_loss"]
    values = [objective_value(expression, losses, start_losses) for expression in objectives]
    return {
        **dict(zip(objective_keys(len(objectives)), values)),
        "loss": losses,
        "forgetting": {c: losses[c] - start_losses[c] for c in losses},
        "step": metrics["step"],
        "total_steps": metrics["total_steps"],
        "eval": math.ceil(metrics["step"] / checkpoint_every),
        "trained_tokens": sum(metrics["tokens"].values()),
    }


class ReportObjectives(TuneReportCallback):
    """Forwards each intermediate eval of the Train run (rank 0's report) to Tune as `row(metrics)`;
    reports without an eval are not forwarded, and the final one comes from the trial itself."""

    def __init__(self, row: Callable[[dict], dict]):
        super().__init__()
        self.row = row

    def after_report(self, run_context, metrics, checkpoint):
        if "eval_loss" in metrics[0] and metrics[0]["step"] < metrics[0]["total_steps"]:
            super().after_report(run_context, [self.row(metrics[0])], None)
