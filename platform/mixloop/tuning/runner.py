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

import json
import math
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from mixloop.config import Share, stage_hash
from mixloop.data.corpora import PreparedCorpora
from mixloop.data.store import read_manifest
from mixloop.errors import MixloopError, StageConflictError
from mixloop.evaluation.evaluate import evaluate_versions
from mixloop.runs.pipeline import PipelineRunner
from mixloop.runs.ray_setup import TRIAL_RESOURCE, init_ray
from mixloop.runs.stages import StageRunner, stage_plan
from mixloop.runs.tracking import Trackers, tokens_through
from mixloop.storage.fs import (
    append_line,
    exists,
    join,
    local_copy,
    read_json,
    read_lines,
    train_storage,
    write_json,
    write_text,
)
from mixloop.train.job import StageJob, stage_job
from mixloop.tuning.objectives import objective_keys, objective_value
from mixloop.tuning.results import append_stage, describe_changes, report, stage_note
from mixloop.tuning.search import Search, load_search
from mixloop.versioning.registry import list_versions, now, read_lineage, verified_version, version_dir
from ray import tune

Log = Callable[[str], None]
RESULT_FILE = "result.json"  # a trial's final objective row: written when it trained to the end
TRACKED_FILE = "tracked.json"  # written once a trial's run went to the trackers


def run_search(
    path: str, address: str | None = None, apply: bool = False, trial: str | None = None, log: Log = print, lock=None
) -> dict:
    """Run or resume a search, then write and print its results (and append the best stage). `lock`: the
    workdir's lock when the caller holds it already."""
    search = load_search(path)
    if apply:
        _check_apply(search, trial)
    pipeline = PipelineRunner(search.spec, log, address, lock)
    with pipeline.locked(f"mixloop tune {path}"):  # trials train from, and write into, the pipeline's workdir
        init_ray(address)
        context = _prepare(search, pipeline)
        grid = _tuner(search, context, log).fit()
        results = report(search, context.folder, grid, context.start_losses, chosen=trial, log=log)
        _track_trials(search, context, results["rows"], pipeline.trackers)
        if apply:
            _apply(search, context, results, log, pipeline.lock)
    return results


def _track_trials(search: Search, context: TrialContext, rows: list[dict], trackers: Trackers) -> None:
    """Each ended trial as a run `<search>/<trial>` of the pipeline's trackers (nested under the pipeline's
    run in MLflow, with the stages trained up to the start version): its stage's settings, its training
    metrics on the pipeline's token axis from the start version, and its objectives. Once per trial: a
    resumed search does not send them again."""
    before = tokens_through(search.start_from, {v["version"]: v for v in list_versions(search.spec.workdir)})
    for row in rows:
        folder = join(context.folder, "trials", row["trial"])
        if row["status"] == "unfinished" or exists(join(folder, TRACKED_FILE)):
            continue
        final = {key: value for key, value in row.items() if key.startswith("objective") and value is not None}
        final.update({f"eval/{corpus}": loss for corpus, loss in row["loss"].items()})
        trackers.replay(
            f"{search.config.name}/{row['trial']}",
            read_lines(join(folder, "metrics.jsonl")),
            before,
            search.resolve(row["stage"]).as_json(),
            final,
        )
        write_json(join(folder, TRACKED_FILE), {"trackers": [type(sink).__name__ for sink in trackers.sinks]})
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


def _apply(search: Search, context: TrialContext, results: dict, log: Log, lock) -> None:
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
    trial_folder = join(context.folder, "trials", best["trial"])
    if not exists(join(trial_folder, "final")):
        raise MixloopError(
            f"trial {best['trial']} left no final weights in {trial_folder}/final: it ran before "
            "mixloop kept them. Fix: run the search again under a new name, then --apply."
        )
    trial_lines = read_lines(join(trial_folder, "metrics.jsonl"))
    metrics = {**json.loads(trial_lines[-1]), "tuned_by": {"search": search.path, "trial": best["trial"]}}
    runner = StageRunner(search.spec, context.prepared, log, lock=lock)
    job = runner.job(stage, context.parent["version"], context.parent["metrics"]["final_lr"])
    runner.publish(
        job,
        stage_plan(stage, job.corpus_dirs),
        context.parent,
        stage_hash(stage, context.parent["stage_hash"]),
        local_copy(join(trial_folder, "final")),
        metrics,
        now(),
    )
    # One append: the report's training curves then show the stage like any other.
    append_line(join(search.spec.workdir, "metrics.jsonl"), "\n".join(trial_lines))
    append_stage(Path(search.pipeline_path), best["stage"], stage_note(search, best))
    log(
        f"appended stage {best['stage']['name']} to {search.pipeline_path}; its version is trial {best['trial']}'s model"
    )


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs, computed once by the search's driver."""

    search: Search
    folder: str  # <workdir>/tune/<name>
    prepared: PreparedCorpora
    corpus_dirs: dict[str, str]  # packed train splits of every corpus a trial may mix
    parent: dict  # lineage of the start version
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
        folder = join(self.folder, "trials", trial_id)
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
            self.parent["metrics"]["final_lr"],
            version_dir(spec.workdir, self.parent["version"]),
            self.corpus_dirs,
            join(folder, "metrics.jsonl"),
            spec.config.model.trust_remote_code,
            evals=self.eval_dirs,
            eval_rows=self.eval_rows,
            progress_lines=False,
            run=trial_id,
            final_dir=join(folder, "final"),
        )


def _prepare(search: Search, pipeline: PipelineRunner) -> TrialContext:
    """Train up to the start version, pack every corpus a trial may read, evaluate the start version."""
    template, workdir = search.resolved_template, search.spec.workdir
    everything = {c: Share(start=1.0, end=1.0) for c in {*template.mixture, *search.searched_corpora}}
    candidates = template.model_copy(update={"mixture": everything})  # every corpus a trial may mix
    prepared = pipeline.train(until=search.start_from, extra_stages=[candidates]).prepared
    rows = search.config.config.eval_rows
    verified_version(workdir, search.start_from)  # every trial starts from it
    start = evaluate_versions(workdir, [search.start_from], prepared.eval, rows)[search.start_from]
    trials = search.config.trials
    return TrialContext(
        search=search,
        folder=join(workdir, "tune", search.config.name),
        prepared=prepared,
        corpus_dirs=prepared.for_stage(candidates),
        parent=read_lineage(workdir, search.start_from),
        eval_dirs=prepared.eval,
        eval_rows=rows,
        start_losses={c: r["loss"] for c, r in start.items()},
        workers=trials.workers or template.max_workers,
        cpus_per_worker=trials.cpus_per_worker or template.cpus_per_worker,
    )


def _tuner(search: Search, context: TrialContext, log: Log) -> tune.Tuner:
    """A new Tuner, or the interrupted one restored (refused if the search spec changed since)."""
    _check_fingerprint(search, context.folder)
    _check_trial_resource()
    # Tune's new output engine prints a configuration box and a TensorBoard hint even at verbose=0;
    # the legacy one is silent there, and the progress lines say what matters.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), _trial_resources(context))
    storage, filesystem = train_storage(join(search.spec.workdir, "tune"))
    experiment = os.path.join(storage, search.config.name)
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        log(f"search {search.config.name}: resuming from {context.folder}")
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
    log(
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


def _check_fingerprint(search: Search, folder: str) -> None:
    record = join(folder, "search.json")
    fingerprint = search.fingerprint()
    if exists(record) and read_json(record)["fingerprint"] != fingerprint:
        raise StageConflictError(
            f"search {search.config.name!r} in {folder} ran with other settings; its trials are not comparable with "
            "these. Fix: give the changed search a new name, or delete that folder to start it again."
        )
    write_json(record, {"fingerprint": fingerprint, "spec": search.path})


def _check_trial_resource() -> None:
    """A new search and a resumed one alike would wait forever for trial drivers without it."""
    import ray

    if ray.cluster_resources().get(TRIAL_RESOURCE, 0) < 1:
        raise MixloopError(
            f"the cluster offers no {TRIAL_RESOURCE!r} resource, which tuning trials' drivers use instead of CPUs. "
            f"Fix: start the head with --resources='{{\"{TRIAL_RESOURCE}\": 16}}' (cluster/ configs do)."
        )


def _concurrency(search: Search, context: TrialContext) -> int:
    import ray

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
    import optuna

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


# ---------------------------------------------------------------- inside a trial


def run_trial(config: dict, context: TrialContext) -> None:
    """Ray Tune's function trainable: train the trial's stage, reporting its intermediate evals, then
    its final row. One worker trains here, in the trial's process; several, on a Ray Train group."""
    trial_id = tune.get_context().get_trial_id()
    folder = join(context.folder, "trials", trial_id)
    append_line(join(folder, "starts.jsonl"), json.dumps({"time": time.time()}))
    if exists(join(folder, RESULT_FILE)):  # it finished before the search was interrupted
        tune.report(read_json(join(folder, RESULT_FILE)))
        return
    stage = context.search.trial_stage(config)
    write_text(join(folder, "stage.yaml"), yaml.safe_dump(stage, sort_keys=False))
    job = context.job(stage, trial_id)
    every = job.stage.checkpoint_every

    def row(metrics: dict) -> dict:
        return objective_row(metrics, context.search.objectives, context.start_losses, every)

    clock = time.time()
    final = _train_here(job, row) if context.in_trial else _train_on_group(job, context, trial_id, row)
    # The final eval is reported here, also when a resumed run had nothing left to train.
    final_row = {**row(final), "wall_s": round(time.time() - clock, 1)}
    write_json(join(folder, RESULT_FILE), final_row)
    tune.report(final_row)


def _train_here(job: StageJob, row: Callable[[dict], dict]) -> dict:
    """Train a one-worker trial in this process: its final metrics."""
    from mixloop.train.loop import run_stages
    from mixloop.train.session import TuneTrial
    from mixloop.train.step import StepHooks

    session = TuneTrial(row, job.stage.use_gpu)
    run_stages([job], session, StepHooks())
    return session.last


def _train_on_group(job: StageJob, context: TrialContext, trial_id: str, row: Callable[[dict], dict]) -> dict:
    """Train a trial on a Ray Train worker group of its own: its final metrics."""
    from mixloop.train.launch import fit_stages

    callback = ReportObjectives(row)
    return fit_stages([job], join(context.folder, "train"), trial_id, callbacks=[callback]).metrics


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


# ---------------------------------------------------------------- Tune parts


class BaselinesFirst(Searcher):
    """Hands out the baseline trials first, then Optuna's proposals. Optuna learns from the baselines
    it can represent (`points`: their parameters, or None for one outside the space, such as a
    ramped mix), as if it had proposed them; a Pareto search's Optuna learns from its own trials only."""

    def __init__(self, optuna: OptunaSearch, baselines: list[dict], points: list[dict | None]):
        super().__init__(metric=optuna.metric, mode=optuna.mode)
        self.optuna, self.waiting, self.baseline_points = optuna, list(zip(baselines, points)), {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.optuna.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict | None:
        if self.waiting:
            config, self.baseline_points[trial_id] = self.waiting.pop(0)
            return config
        return self.optuna.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.baseline_points:
            self.optuna.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.baseline_points:
            self.optuna.on_trial_complete(trial_id, result, error)
            return
        point, metric = self.baseline_points[trial_id], self.optuna.metric
        if point is not None and result and not error and isinstance(metric, str) and math.isfinite(result[metric]):
            self.optuna.add_evaluated_point(point, result[metric])

    def save(self, checkpoint_path: str) -> None:
        with tempfile.TemporaryDirectory() as folder:  # Tune keeps one file per searcher: Optuna's goes inside
            self.optuna.save(os.path.join(folder, "optuna.pkl"))
            optuna_state = open(os.path.join(folder, "optuna.pkl"), "rb").read()
        with open(checkpoint_path, "wb") as file:
            pickle.dump(
                {"waiting": self.waiting, "baseline_points": self.baseline_points, "optuna": optuna_state}, file
            )

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            state = pickle.load(file)
        # A search saved before Optuna learned from baselines kept their configs and ids only.
        self.waiting = [item if isinstance(item, tuple) else (item, None) for item in state["waiting"]]
        self.baseline_points = state.get("baseline_points", dict.fromkeys(state.get("baseline_ids", ())))
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "optuna.pkl"), "wb") as file:
                file.write(state["optuna"])
            self.optuna.restore(os.path.join(folder, "optuna.pkl"))


class SparingBaselines(ASHAScheduler):
    """ASHA that ranks baselines with the other trials but never stops them (the verdict compares
    the best trial with the finished baselines), nor a trial at its last eval (ASHA stops trials at
    max_t, which would kill it before it records its result)."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        spared = "baseline" in trial.config or result["step"] == result["total_steps"]
        return TrialScheduler.CONTINUE if spared else decision


class ProgressLines(tune.Callback):
    """One line per trial start, eval and end, instead of Tune's status tables. (Tune pickles its
    callbacks with the search, so this one prints instead of holding a log function.)"""

    def __init__(self, search: Search):
        self.search = search

    @staticmethod
    def log(line: str) -> None:
        print(line, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.log(f"trial {trial.trial_id}: started, {describe_changes(self.search.decode(trial.config), trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        values = " ".join(f"{key} {result[key]:.4f}" for key in objective_keys(len(self.search.objectives)))
        self.log(f"trial {trial.trial_id}: step {result['step']}/{result['total_steps']} {values}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.log(f"trial {trial.trial_id}: ended")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log(f"trial {trial.trial_id}: failed; see {trial.path}/error.txt")
