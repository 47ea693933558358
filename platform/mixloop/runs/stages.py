"""Versions from stages: the starting version `base`, each stage trained on Ray Train and published
as its version, and the check that no finished stage was edited (versions are immutable)."""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from mixloop.config import BASE_VERSION, ResolvedStage, Spec, base_hash, resolve_stage, stage_hash
from mixloop.data.corpora import PreparedCorpora
from mixloop.data.mixplan import MixPlan
from mixloop.data.store import read_manifest
from mixloop.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from mixloop.errors import MixloopError, StageConflictError
from mixloop.runs.tracking import Trackers, polling
from mixloop.storage.fs import exists, join, local_copy, remove
from mixloop.storage.layout import Workdir
from mixloop.train.job import StageJob, stage_job
from mixloop.train.metrics import last_metrics
from mixloop.train.schedule import final_lr
from mixloop.versioning.lineage import Lineage, VersionMetrics
from mixloop.versioning.registry import (
    list_versions,
    now,
    publish,
    read_lineage,
    require_lineage,
    verified_version,
    version_dir,
)

logger = logging.getLogger(__name__)


def ensure_base(spec: Spec, tokenizer_dir: str) -> Lineage:
    """The lineage of version `base`, the starting weights (a seeded new model, or a copy of
    model.path), published first if the workdir lacks it."""
    # lazy: transformers' model code, which `mixloop validate` (it imports this module) does without
    from mixloop.train.model import check_vocabulary, load_config, load_model, model_config, new_model

    workdir, model_spec, seed = spec.workdir, spec.config.model, spec.config.seed
    source = {**model_spec.model_dump(exclude_none=True), "path": spec.model_source() if model_spec.path else None}
    digest = base_hash(seed, tokenizer_fingerprint(tokenizer_dir))
    existing = read_lineage(workdir, BASE_VERSION)
    if existing:
        # Versions published before the record was kept compare their hash only.
        if existing.stage_hash != digest or (existing.model or source) != source:
            raise StageConflictError(
                f"{version_dir(workdir, BASE_VERSION)} was made from another model, tokenizer or seed. "
                "Fix: use a new workdir for a new model, or restore the spec's model/tokenizer/seed."
            )
        return existing
    tokenizer, commit = load_tokenizer(tokenizer_dir), None
    if model_spec.path:
        path, commit = spec.model_folder()
        check_vocabulary(load_config(path, model_spec.trust_remote_code).vocab_size, tokenizer)
        model = load_model(path, model_spec.trust_remote_code)
    else:
        model = new_model(model_config(model_spec.preset, model_spec.config, tokenizer), seed)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        lineage = Lineage(
            version=BASE_VERSION,
            stage_hash=digest,
            model=source,
            model_commit=commit,  # the hub snapshot it was copied from, if any
            started=now(),
            parameters=sum(p.numel() for p in model.parameters()),
            metrics=VersionMetrics(final_lr=0.0),
        )
        publish(workdir, folder, tokenizer_dir, lineage)
    logger.info(f"published version {BASE_VERSION} ({lineage.parameters:,} parameters)")
    return require_lineage(workdir, BASE_VERSION)


def edited_stages(spec: Spec) -> list[str]:
    """A problem for every finished stage of the spec whose settings (or whose parent's) changed
    after it produced its version: versions are immutable, so such a spec is refused."""
    workdir = spec.workdir
    base = read_lineage(workdir, BASE_VERSION)
    if base is None:
        return []
    hashes, problems = {BASE_VERSION: base.stage_hash}, []
    previous = BASE_VERSION
    for index, stage in enumerate(spec.config.stages):
        parent = stage.start_from or previous
        digest = stage_hash(resolve_stage(spec.config, stage), hashes.get(parent, ""))
        existing = read_lineage(workdir, stage.name)
        if existing is not None and existing.stage_hash != digest:
            problems.append(
                f"stages[{index}] ({stage.name}): changed after it produced version {stage.name} "
                f"(hash {existing.stage_hash} -> {digest}). Versions are immutable. Fix: restore the stage's "
                f"settings, give the changed stage a new name, or delete {version_dir(workdir, stage.name)} to "
                "retrain it."
            )
        hashes[stage.name] = existing.stage_hash if existing is not None else digest
        previous = stage.name
    return problems


def stage_plan(stage: ResolvedStage, corpus_dirs: dict[str, str]) -> MixPlan:
    """The mix plan of a whole stage over its packed corpora."""
    rows = {name: read_manifest(folder)["rows"] for name, folder in corpus_dirs.items()}
    return MixPlan.for_stage(stage, rows)


def repeat_warnings(stage: ResolvedStage, epochs: dict[str, float]) -> list[str]:
    return [
        f"stage {stage.name} passes over corpus {name!r} {passes:.1f} times, more than max_repeats "
        f"{stage.max_repeats:g}: add data to it or lower its weight"
        for name, passes in epochs.items()
        if passes > stage.max_repeats
    ]


class StageRunner:
    """Trains the stages of one preparation and publishes each as its version."""

    def __init__(
        self,
        spec: Spec,
        prepared: PreparedCorpora,
        hooks=None,
        lock=None,
        trackers: Trackers | None = None,
        progress_bar: bool = False,
    ):
        """`lock`: the workdir's lock, checked before each publish; `hooks`: see train.step.StepHooks;
        `trackers`: where the stage's metrics are forwarded while it trains; `progress_bar`: show a
        live bar instead of the workers' progress lines (in a terminal)."""
        self.spec, self.prepared, self.hooks, self.lock = spec, prepared, hooks, lock
        self.progress_bar = progress_bar
        self.trackers = trackers or Trackers(spec.workdir, sinks=[])
        self.workdir = spec.workdir

    def job(self, stage: ResolvedStage, parent: str, parent_final_lr: float, **extra) -> StageJob:
        """The job of `stage` trained from the version `parent`, whose stage ended at `parent_final_lr`."""
        return stage_job(
            self.spec.config.name,
            stage,
            parent_final_lr,
            version_dir(self.workdir, parent),
            self.prepared.for_stage(stage),
            Workdir(self.workdir).metrics,
            self.spec.config.model.trust_remote_code,
            **extra,
        )

    def run_name(self, stage: ResolvedStage, digest: str) -> str:
        """The stage's own Ray Train run name (train.launch.run_name); a group runs as its first stage's."""
        from mixloop.train.launch import run_name  # lazy: ray

        return run_name(self.spec.config.name, stage.name, digest, self.prepared.for_stage(stage))

    def train(self, stages: list[tuple[ResolvedStage, str]], parent: Lineage, run: str) -> list[Lineage]:
        """Train consecutive stages (with their hashes; each the next one's parent, all asking for the
        same workers) in turn on one worker group, as the Ray Train run `run`, from the version whose
        lineage is `parent`; each is published as its version as soon as it ends. Their lineages."""
        from mixloop.train.launch import fit_stages  # lazy: ray

        verified_version(self.workdir, parent.version)  # a clear error now, not three failed restarts
        jobs, version, lr = [], parent.version, parent.metrics.final_lr
        for stage, digest in stages:
            own = self.run_name(stage, digest)  # in the paths: a stage edited since leaves other names behind
            jobs.append(
                self.job(
                    stage,
                    version,
                    lr,
                    progress_lines=not self.progress_bar,
                    run=own,
                    final_dir=Workdir(self.workdir).final_weights(run, own),
                )
            )
            self._announce(stage, version, stage_plan(stage, jobs[-1].corpus_dirs))
            version, lr = stage.name, final_lr(stage.total_steps, stage.lr, jobs[-1].start_lr)
        if len(jobs) > 1:
            logger.info(f"stages {', '.join(job.stage.name for job in jobs)}: one worker group trains them in turn")
        before = list_versions(self.workdir).tokens_through(parent.version)
        publisher = Publisher(self, jobs, [digest for _, digest in stages], parent)
        with self.trackers.follow([job.stage for job in jobs], before, bar=self.progress_bar):
            with publisher.while_training():
                fit_stages(jobs, Workdir(self.workdir).train, run, hooks=self.hooks)
        return publisher.lineages

    def _announce(self, stage: ResolvedStage, parent: str, plan: MixPlan) -> None:
        logger.info(
            f"stage {stage.name}: training {stage.total_steps} steps of {stage.global_batch_tokens} tokens "
            f"from version {parent} on {stage.max_workers} worker(s)"
        )
        for warning in repeat_warnings(stage, plan.epochs()):
            logger.warning(f"warning: {warning}")

    def publish(
        self,
        job: StageJob,
        plan: MixPlan,
        parent: Lineage,
        digest: str,
        checkpoint_dir: str,
        metrics: VersionMetrics,
        started: str,
    ) -> Lineage:
        """Publish a stage's final checkpoint as its version, with its lineage."""
        # lazy: transformers' model code (through train.model), which `mixloop validate` does without
        from mixloop.train.checkpoint import read_state

        stage = job.stage
        state = read_state(checkpoint_dir)
        if state.step != stage.total_steps:
            raise MixloopError(
                f"stage {stage.name}: the last checkpoint is at step {state.step}, "
                f"not {stage.total_steps}; run again to finish it"
            )
        lineage = Lineage(
            version=stage.name,
            parent=parent.version,
            stage=stage,
            stage_hash=digest,
            started=started,
            tokens_per_corpus=dict(zip(stage.mixture, state.tokens)),
            rows_per_corpus=plan.rows_per_corpus(),
            epochs_per_corpus=plan.epochs(),
            data_fingerprints={n: Path(d).name for n, d in job.corpus_dirs.items()},
            metrics=metrics.model_copy(
                update={"final_lr": state.lr, "steps": state.step, "resumed_from": state.resumed_from}
            ),
            overrides=self.spec.overrides,  # set on the command line, not in the spec file
        )
        if self.lock is not None:
            self.lock.ensure_held()
        publish(self.workdir, checkpoint_dir, self.prepared.tokenizer_dir, lineage)
        logger.info(f"stage {stage.name}: published version {stage.name}")
        return require_lineage(self.workdir, stage.name)


class Publisher:
    """Publishes a group's stages in order, each as soon as its workers left its final weights: from a
    thread while the group trains, then once more when it stops (also when it failed: the stages that
    ended are versions). A stage's metrics are its last line; its wall seconds run from the previous
    stage's end (the first stage's include the group's start-up)."""

    POLL_S = 1.0

    def __init__(self, runner: StageRunner, jobs: list[StageJob], digests: list[str], parent: Lineage):
        self.runner, self.pending, self.parent = runner, list(zip(jobs, digests)), parent
        self.lineages: list[Lineage] = []
        self.started, self.warned = time.time(), set[str]()

    @contextmanager
    def while_training(self):
        with polling(self.publish_ready, self.POLL_S, "publisher", self._warn):
            yield
        if self.pending:
            job = self.pending[0][0]
            raise MixloopError(
                f"stage {job.stage.name}: its workers ended without its final weights in "
                f"{job.final_dir}; run again to finish it"
            )

    def _warn(self, exc: Exception) -> None:
        line = f"warning: publishing failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); tried again in a second"
        if line not in self.warned:  # once per error, not every second of an outage
            self.warned.add(line)
            logger.warning(line)

    def publish_ready(self) -> None:
        """Publish the pending stages, in order, whose final weights are there."""
        # lazy: transformers' model code (through train.model), which `mixloop validate` does without
        from mixloop.train.checkpoint import STATE_FILE

        while self.pending:
            job, digest = self.pending[0]
            assert job.final_dir is not None  # StageRunner.train gives every stage of a group its final_dir
            if not exists(join(job.final_dir, STATE_FILE)):
                return
            last = last_metrics(job.metrics_path, job.stage.name)
            if last is None:  # (its last line is written before its final weights)
                raise MixloopError(f"stage {job.stage.name}: final weights, but no line in {job.metrics_path}")
            wall_seconds = round(max(last.time - self.started, 0.0), 1)
            metrics = VersionMetrics(**last.model_dump(), final_lr=last.lr, wall_seconds=wall_seconds)
            plan = stage_plan(job.stage, job.corpus_dirs)
            lineage = self.runner.publish(
                job, plan, self.parent, digest, local_copy(job.final_dir), metrics, now(self.started)
            )
            remove(job.final_dir)  # the version holds the same files
            self.lineages.append(lineage)
            self.parent, self.started = lineage, last.time
            self.pending.pop(0)
