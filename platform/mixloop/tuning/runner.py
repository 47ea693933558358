"""`mixloop tune`: every trial trains the tuned stage from the same start version. A trial of one
worker trains in its Ray Tune trial's own process (train.session.TuneTrial), paying no Ray Train
start-up; a trial of several workers is a Ray Train run of its own.

The driver prepares every packed corpus the trials may read and evaluates the start version before
the search, so trials only train: no trial tokenizes, and Ray Data never competes with them for
CPUs. Trial drivers hold a custom resource instead of a CPU, so those of Ray Train runs never take
the CPUs their workers need (one that trains itself holds its worker's CPUs); the number of trials at
once follows the cluster's CPUs (or GPUs).

The two baselines (the stage's own mix and the stratified mix) are the first trials of every
search; Optuna proposes the others, and ASHA stops weak trials at intermediate evals (never a
baseline, which must finish to be compared with). Ray Tune keeps the search's state under
<workdir>/tune/<name>, so a search that was interrupted resumes where it stopped: finished trials
are not trained again, and unfinished ones resume from their last checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import optuna
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from mixloop.config import Share, stage_hash
from mixloop.data.store import read_manifest
from mixloop.errors import MixloopError, StageConflictError
from mixloop.evaluation.evaluate import evaluate_versions
from mixloop.runs.pipeline import PipelineRunner
from mixloop.runs.ray_setup import TRIAL_RESOURCE, init_ray
from mixloop.runs.stages import StageRunner, stage_plan
from mixloop.runs.tracking import Trackers
from mixloop.storage.fs import (
    append_line,
    exists,
    local_copy,
    read_json,
    train_storage,
    write_json,
)
from mixloop.storage.layout import SearchFolder, Workdir
from mixloop.train.metrics import as_lines, read_metrics
from mixloop.tuning.objectives import objective_keys
from mixloop.tuning.plugins import BaselinesFirst, ProgressLines, SparingBaselines
from mixloop.tuning.results import append_stage, report, stage_note
from mixloop.tuning.search import Search, load_search
from mixloop.tuning.trials import TrialContext, run_trial
from mixloop.versioning.lineage import VersionMetrics
from mixloop.versioning.registry import list_versions, now, require_lineage, verified_version

logger = logging.getLogger(__name__)


def run_search(path: str, address: str | None = None, apply: bool = False, trial: str | None = None, lock=None) -> dict:
    """Run or resume a search, then write and print its results (and append the best stage). `lock`: the
    workdir's lock when the caller holds it already."""
    search = load_search(path)
    if apply:
        _check_apply(search, trial)
    pipeline = PipelineRunner(search.spec, address, lock)
    with pipeline.locked(f"mixloop tune {path}"):  # trials train from, and write into, the pipeline's workdir
        init_ray(address)
        context = _prepare(search, pipeline)
        grid = _tuner(search, context).fit()
        results = report(search, context.folder, grid, context.start_losses, chosen=trial)
        _track_trials(search, context, results["rows"], pipeline.trackers)
        if apply:
            _apply(search, context, results, pipeline.lock)
    return results


def _track_trials(search: Search, context: TrialContext, rows: list[dict], trackers: Trackers) -> None:
    """Each ended trial as a run `<search>/<trial>` of the pipeline's trackers (nested under the pipeline's
    run in MLflow, with the stages trained up to the start version): its stage's settings, its training
    metrics on the pipeline's token axis from the start version, and its objectives. Once per trial: a
    resumed search does not send them again."""
    before = list_versions(search.spec.workdir).tokens_through(search.start_from)
    for row in rows:
        folder = context.folder.trial(row["trial"])
        if row["status"] == "unfinished" or exists(folder.tracked):
            continue
        final = {key: value for key, value in row.items() if key.startswith("objective") and value is not None}
        final.update({f"eval/{corpus}": loss for corpus, loss in row["loss"].items()})
        trackers.replay(
            f"{search.config.name}/{row['trial']}",
            read_metrics(folder.metrics),
            before,
            search.resolve(row["stage"]).as_json(),
            final,
        )
        write_json(folder.tracked, {"trackers": [type(sink).__name__ for sink in trackers.sinks]})
    trackers.close()


def _check_apply(search: Search, trial: str | None) -> None:
    """Before any work: what would make --apply fail at the end."""
    if search.config.name in search.spec.stage_names():
        raise MixloopError(
            f"{search.pipeline_path} already has a stage named {search.config.name!r}. "
            "Fix: give the search a new name, or leave out --apply."
        )
    if len(search.objectives) > 1 and trial is None:
        raise MixloopError(
            "a search with several objectives has no single best trial. Fix: run it without --apply, "
            "pick a trial of the Pareto front, then add --apply --trial ID."
        )


def _apply(search: Search, context: TrialContext, results: dict, lock) -> None:
    """Publish the chosen trial's final checkpoint as the stage's version, then append the stage to the
    pipeline file. The stage resolves to the trial's trajectory (the same stage hash), so `mixloop run`
    finds it done instead of training it again."""
    best = results["best"]
    if results["interrupted"] or best is None:
        raise MixloopError(
            "not applied: the search did not end with a finished trial. "
            "Fix: run it again (it resumes), then add --apply."
        )
    stage = search.resolve(best["stage"])
    trial = context.folder.trial(best["trial"])
    if not exists(trial.final):
        raise MixloopError(
            f"trial {best['trial']} left no final weights in {trial.final}: it ran before "
            "mixloop kept them. Fix: run the search again under a new name, then --apply."
        )
    records = read_metrics(trial.metrics)
    tuned_by = {"search": search.path, "trial": best["trial"]}
    metrics = VersionMetrics(**records[-1].model_dump(), final_lr=records[-1].lr, tuned_by=tuned_by)
    runner = StageRunner(search.spec, context.prepared, lock=lock)
    job = runner.job(stage, context.parent.version, context.parent.metrics.final_lr)
    runner.publish(
        job,
        stage_plan(stage, job.corpus_dirs),
        context.parent,
        stage_hash(stage, context.parent.stage_hash),
        local_copy(trial.final),
        metrics,
        now(),
    )
    # One append: the report's training curves then show the stage like any other.
    append_line(Workdir(search.spec.workdir).metrics, as_lines(records))
    append_stage(Path(search.pipeline_path), best["stage"], stage_note(search, best))
    logger.info(
        f"appended stage {best['stage']['name']} to {search.pipeline_path}; its version is trial {best['trial']}'s model"
    )


def _prepare(search: Search, pipeline: PipelineRunner) -> TrialContext:
    """Train up to the start version, pack every corpus a trial may read, evaluate the start version."""
    template, workdir = search.resolved_template, search.spec.workdir
    everything = {c: Share(start=1.0, end=1.0) for c in {*template.mixture, *search.searched_corpora}}
    candidates = template.model_copy(update={"mixture": everything})  # every corpus a trial may mix
    prepared = pipeline.train(until=search.start_from, extra_stages=[candidates]).prepared
    rows = search.spec.config.eval_rows
    verified_version(workdir, search.start_from)  # every trial starts from it
    start = evaluate_versions(workdir, [search.start_from], prepared.eval, rows)[search.start_from]
    trials = search.config.trials
    return TrialContext(
        search=search,
        folder=Workdir(workdir).search(search.config.name),
        prepared=prepared,
        corpus_dirs=prepared.for_stage(candidates),
        parent=require_lineage(workdir, search.start_from),
        eval_dirs=prepared.eval,
        eval_rows=rows,
        start_losses={c: r["loss"] for c, r in start.items()},
        workers=trials.workers or template.max_workers,
        cpus_per_worker=trials.cpus_per_worker or template.cpus_per_worker,
    )


def _tuner(search: Search, context: TrialContext) -> tune.Tuner:
    """A new Tuner, or the interrupted one restored (refused if the search spec changed since)."""
    _check_fingerprint(search, context.folder)
    _check_trial_resource()
    # Tune's new output engine prints a configuration box and a TensorBoard hint even at verbose=0;
    # the legacy one is silent there, and the progress lines say what matters.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), _trial_resources(context))
    storage, filesystem = train_storage(Workdir(search.spec.workdir).tune)
    experiment = os.path.join(storage, search.config.name)
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        logger.info(f"search {search.config.name}: resuming from {context.folder.root}")
        # A failed trial stays failed (Ray Train already retried its workers): it would fail again.
        return tune.Tuner.restore(
            experiment,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            param_space=search.param_space(),
            storage_filesystem=filesystem,
        )
    concurrency = _concurrency(search, context)
    manifests = {c: read_manifest(d)["tokens"] for c, d in context.corpus_dirs.items()}
    baselines = search.baselines(manifests)
    searcher = BaselinesFirst(_optuna(search), baselines, [search.encode(search.trial_stage(b)) for b in baselines])
    logger.info(
        f"search {search.config.name}: {search.config.trials.count} trials from version {search.start_from}, "
        f"{concurrency} at a time, {context.workers} worker(s) each"
    )
    return tune.Tuner(
        trainable,
        param_space=search.param_space(),
        # Not reuse_actors: a trial ASHA stops takes longer to shut its Train run down than Tune waits
        # (TUNE_FUNCTION_THREAD_TIMEOUT_S, 2 s) before reusing its driver, and the next trial then fails.
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=_scheduler(search),
            num_samples=search.config.trials.count,
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(
            name=search.config.name,
            storage_path=storage,
            storage_filesystem=filesystem,
            verbose=0,
            callbacks=[ProgressLines(search)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            # On a worker group, Ray Train already restarted the workers: a failed trial stays failed.
            failure_config=tune.FailureConfig(
                max_failures=search.resolved_template.max_failures if context.in_trial else 0
            ),
        ),
    )


def _trial_resources(context: TrialContext) -> dict[str, float]:
    """A trial's driver holds a custom resource instead of a CPU; one that trains itself also holds its
    worker's resources."""
    if not context.in_trial:
        return {TRIAL_RESOURCE: 1}
    template = context.search.resolved_template
    gpu = {"GPU": 1} if template.use_gpu else {}
    return {TRIAL_RESOURCE: 1, "CPU": context.cpus_per_worker, **gpu, **template.resources_per_worker}


def _check_fingerprint(search: Search, folder: SearchFolder) -> None:
    record = folder.record
    fingerprint = search.fingerprint()
    stored = read_json(record)
    if stored is not None and stored["fingerprint"] != fingerprint:
        raise StageConflictError(
            f"search {search.config.name!r} in {folder.root} ran with other settings; its trials are not comparable with "
            "these. Fix: give the changed search a new name, or delete that folder to start it again."
        )
    write_json(record, {"fingerprint": fingerprint, "spec": search.path})


def _check_trial_resource() -> None:
    """A new search and a resumed one alike would wait forever for trial drivers without it."""
    if ray.cluster_resources().get(TRIAL_RESOURCE, 0) < 1:
        raise MixloopError(
            f"the cluster offers no {TRIAL_RESOURCE!r} resource, which tuning trials' drivers use instead of CPUs. "
            f"Fix: start the head with --resources='{{\"{TRIAL_RESOURCE}\": 16}}' (cluster/ configs do)."
        )


def _concurrency(search: Search, context: TrialContext) -> int:
    if search.config.trials.max_concurrent:
        return search.config.trials.max_concurrent
    resources = ray.cluster_resources()
    template = search.resolved_template
    per_worker = {"CPU": context.cpus_per_worker, **template.resources_per_worker}
    if template.use_gpu:
        per_worker.setdefault("GPU", 1)
    fits = min(int(resources.get(name, 0) // (amount * context.workers)) for name, amount in per_worker.items())
    return max(1, min(fits, search.config.trials.count))


def _optuna(search: Search) -> OptunaSearch:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its INFO lines repeat what the progress lines say
    searched = search.config.trials.count - 2
    # TPE handles one objective or several (multi-objective TPE); it samples at random for its first
    # trials, so few of them here, and a liar so that concurrent trials do not all pick the same point.
    sampler = optuna.samplers.TPESampler(
        seed=search.seed, n_startup_trials=max(1, searched // 2), multivariate=True, constant_liar=True
    )
    keys = objective_keys(len(search.objectives))
    metric, mode = (keys[0], "min") if len(keys) == 1 else (keys, ["min"] * len(keys))
    return OptunaSearch(metric=metric, mode=mode, sampler=sampler)


def _scheduler(search: Search) -> TrialScheduler:
    asha = search.config.asha
    if asha is None or len(search.objectives) > 1:
        return FIFOScheduler()
    return SparingBaselines(
        metric="objective",
        mode="min",
        time_attr="eval",
        max_t=search.config.trials.evals,
        grace_period=asha.grace_evals,
        reduction_factor=asha.reduction_factor,
    )
