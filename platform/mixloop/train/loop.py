"""The one training loop every stage runs, on each Ray Train worker.

A worker group trains one stage, or several consecutive ones that need the same
workers (each the next one's parent): then the group's start-up (Ray Train's
controller and workers, importing torch, loading the model) is paid once, and
each stage starts from the model its predecessor ended with, still in memory.

A step trains one global batch of `rows_per_step` packed rows chosen by the mix
plan. The batch is cut into micro-batches; worker r of W takes micro-batches
r, r+W, ... and accumulates, so the trajectory does not depend on W. The
loop's position is the step alone: a restart at any world size reads the same
rows from the plan (see docs/ARCHITECTURE.md, "Determinism").

Rank 0's lines (progress, resume, preemption) are printed, not logged as the driver's are (console.py):
this runs in a Ray worker process, which has none of the driver's handlers, and Ray forwards a
worker's stdout to the driver, which shows each line with the worker's prefix, at once.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import resource
import time

import torch

from mixloop.data.mixplan import MixPlan
from mixloop.data.store import PackedCorpus
from mixloop.errors import MixloopError
from mixloop.train.batches import StepLoader, micro_batches_of
from mixloop.train.checkpoint import Checkpointer, Start, latest_start, unwrapped
from mixloop.train.heldout import evaluate_model
from mixloop.train.job import StageJob
from mixloop.train.metrics import MetricsRecord, append_metrics, read_metrics
from mixloop.train.schedule import learning_rate
from mixloop.train.session import TrainingSession, WorkerGroup
from mixloop.train.step import Progress, StepHooks, StepTimer, StepTrainer


class NonFiniteError(MixloopError):
    """Training met a non-finite loss or gradient and the stage says to stop."""


def train_stages(config: dict) -> None:
    """Ray Train's train_loop_per_worker. config: {"jobs": the StageJobs of the group as JSON, in order;
    "hooks": StepHooks for tests, or None}. After a restart, the stages before the latest checkpoint's
    are done and skipped."""
    _quiet_report_lines()
    jobs = [StageJob.model_validate(job) for job in config["jobs"]]
    run_stages(jobs, WorkerGroup(), config.get("hooks") or StepHooks())


def run_stages(jobs: list[StageJob], session: TrainingSession, hooks: StepHooks) -> None:
    """The stages of `jobs`, in order, where `session` (train.session) says; see train_stages."""
    first, start = _resume_point(jobs, latest_start(session, jobs[0].trust_remote_code), session.run)
    for index in range(first, len(jobs)):
        worker = StageWorker(jobs[index], session, hooks, start)
        worker.run()
        start = Start(worker.handover()) if index + 1 < len(jobs) else None
        del worker  # its optimizer and DistributedDataParallel wrapper go before the next stage's


def _resume_point(jobs: list[StageJob], latest: Start | None, run: str | None) -> tuple[int, Start | None]:
    """The stage to start with, and where from. The latest checkpoint of the Ray run `run` decides: the
    stages before its stage are done. A checkpoint of none of these stages is of one the driver
    published already, or of a stage since edited: the first stage then starts from its parent
    version. (Runs of one stage, before groups, saved no stage: the run was that stage's own.)"""
    runs = [job.run for job in jobs]
    if latest is None:
        return 0, None
    stage = (latest.state.run if latest.state is not None else None) or run
    return (runs.index(stage), latest) if stage in runs else (0, None)


class StageWorker:
    """One worker's part of a stage: set up from the job, the session (train.session: its rank,
    device, reports) and where it starts (a checkpoint, or the model the group's previous stage ended
    with, or the parent version), then the steps."""

    def __init__(self, job: StageJob, session: TrainingSession, hooks: StepHooks, start: Start | None):
        self.job, self.stage, self.hooks = job, job.stage, hooks
        self.rank, self.world, self.device = session.rank, session.world, session.device
        torch.set_num_threads(max(1, int(self.stage.cpus_per_worker)))
        self.names = list(self.stage.mixture)
        corpora = [PackedCorpus(job.corpus_dirs[name]) for name in self.names]
        geometry, total = self.stage.geometry, self.stage.total_steps
        plan = MixPlan.for_stage(self.stage, {n: len(c) for n, c in zip(self.names, corpora)})
        self.checkpointer = Checkpointer(job, session)
        model, self.optimizer, self.state = self.checkpointer.start(start)
        self.model = session.prepare_model(model)
        self.trainer = StepTrainer(job, self.model, self.optimizer, self.world, self.device, hooks)
        mine = micro_batches_of(self.rank, self.world, geometry.micro_batches)
        self.loader = StepLoader(plan, corpora, geometry, total, mine, pin_memory=self.device.type == "cuda")
        self.progress, self.timer = Progress(len(self.names), self.device), StepTimer()
        self.preemption = PreemptionCheck(self.stage.name, session)
        self.window_start, self.window_step = time.time(), self.state.step
        self.row_hashes: dict[int, str] = {}  # step -> the hash of the rows it trained, in this window

    def run(self) -> None:
        if self.rank == 0 and self.state.resumed_from is not None:
            print(_resume_line(self.job, self.state.step), flush=True)  # a worker prints: see the docstring
        stage, total = self.stage, self.stage.total_steps
        for step in range(self.state.step, total):
            self.hooks.before_step(step)
            grad_norm = self.train_step(step)
            done = self.state.step
            if done % stage.log_every == 0 or done % stage.checkpoint_every == 0 or done == total:
                self.report(grad_norm)
        self.loader.close()

    def handover(self) -> torch.nn.Module:
        """A copy of the trained model for the group's next stage: the copy carries no gradients and none
        of the DistributedDataParallel hooks of this stage's wrapper, as if loaded from the version. The
        optimizer and the wrapper go first, so the copy is the only thing held twice."""
        model = unwrapped(self.model)
        model.zero_grad(set_to_none=True)
        del self.model, self.trainer, self.optimizer
        gc.collect()
        return copy.deepcopy(model)

    def train_step(self, step: int) -> float:
        """Train step `step` (0-based); its gradient norm."""
        lr = learning_rate(step, self.stage.total_steps, self.stage.lr, self.job.start_lr)
        with self.timer("data"):
            batch = self.loader.get(step)
        self.row_hashes[step + 1] = batch.row_hash
        grad_norm = self.trainer.step(batch, lr, self.progress, step, self.timer)
        if not math.isfinite(grad_norm):
            if self.stage.nonfinite == "stop":
                raise NonFiniteError(
                    f"stage {self.stage.name}: non-finite loss or gradient at step {step + 1}. "
                    "Its last good checkpoint is kept. Fix: lower lr.peak or set nonfinite: skip."
                )
            self.state.skipped_steps += 1
        self.state.step, self.state.lr = step + 1, lr
        return grad_norm

    def report(self, grad_norm: float) -> None:
        """Log the window's metrics (rank 0), and checkpoint when one is due or a node is going."""
        record = self.metrics(grad_norm)
        step, last = self.state.step, self.state.step == self.stage.total_steps
        with self.timer("report"):  # counted in the next window
            if self.rank == 0:
                append_metrics(self.job.metrics_path, record)
                if self.job.progress_lines:
                    print(_progress_line(record), flush=True)  # a worker prints: see the docstring
            noticed = self.preemption.noticed(step)  # a collective: every rank, every report
            if step % self.stage.checkpoint_every == 0 or last or noticed:
                metrics = record.model_dump()  # what Ray Train (and a tuning trial's Tune) receives
                if self.job.evals and self.rank == 0:  # the other ranks wait at the report's barrier
                    metrics["eval_loss"] = _evaluate(self.model, self.job.evals, self.job.eval_rows, self.device)
                self.checkpointer.save(self.model, self.optimizer, self.state, metrics)

    def metrics(self, grad_norm: float) -> MetricsRecord:
        """The metrics of the steps since the last report (all-reduced), and the state's token tally."""
        loss, supervised, tokens = self.progress.reduced()
        self.state.add_tokens(tokens)
        elapsed, steps = time.time() - self.window_start, max(self.state.step - self.window_step, 1)
        per_corpus = {n: float(total / s) for n, total, s in zip(self.names, loss, supervised) if s > 0}
        record = MetricsRecord(
            stage=self.stage.name,
            step=self.state.step,
            total_steps=self.stage.total_steps,
            lr=self.state.lr,
            loss=float(loss.sum() / supervised.sum().clamp(min=1)),
            loss_per_corpus=per_corpus,
            grad_norm=grad_norm,
            skipped_steps=self.state.skipped_steps,
            tokens_per_s=float(tokens.sum()) / max(elapsed, 1e-9),
            step_seconds=elapsed / steps,
            tokens=dict(zip(self.names, self.state.tokens)),
            time=time.time(),
            peak_memory_mb=_peak_memory_mb(),
            row_hashes=self.row_hashes,
            workers=self.world,
            **self.timer.per_step(self.state.step - self.window_step),
        )
        self.window_start, self.window_step, self.row_hashes = time.time(), self.state.step, {}
        return record


def _quiet_report_lines() -> None:
    """Ray Train 2.60 logs every report, metrics and all, at INFO through a logger named after its
    file, which LoggingConfig does not reach; the progress lines say the same in one line."""
    from ray.train.v2._internal.execution import context  # lazy: ray

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class PreemptionCheck:
    """Asks Ray, at every report, whether a node of this group is about to be reclaimed (a spot
    preemption notice). On a new notice the stage checkpoints at once and trains on; Ray restarts
    the group when the node goes, and the restart loses no step."""

    def __init__(self, stage: str, session: TrainingSession):
        self.stage, self.session, self.rank = stage, session, session.rank
        self.seen: set[str] = set()  # the preempted nodes already noticed

    def noticed(self, step: int) -> bool:
        info = self.session.preemption()  # a broadcast from rank 0: every rank calls it
        nodes = set(info.preempted_node_ids) if info is not None else set()
        if not nodes - self.seen:
            return False
        self.seen |= nodes
        if self.rank == 0:
            deadline = max(info.deadline_ms / 1000 - time.time(), 0) if info.deadline_ms else None
            print(  # a worker prints: see the module's docstring
                f"[{self.stage}] preemption notice for node(s) {', '.join(sorted(n[:8] for n in nodes))}"
                + (f", {deadline:.0f} s left" if deadline is not None else "")
                + f": checkpointing at step {step}",
                flush=True,
            )
        return True


def _resume_line(job: StageJob, step: int) -> str:
    """What a restart cost: steps trained since the checkpoint (to redo) and time since the last report."""
    logged = read_metrics(job.metrics_path, job.stage.name)
    redo = max([m.step for m in logged] + [step]) - step
    since = time.time() - logged[-1].time if logged else 0.0
    lost = f"{redo} logged step(s) to redo" if redo else "no logged step lost"
    return (
        f"[{job.stage.name}] resumed from checkpoint at step {step}/{job.stage.total_steps}: "
        f"{lost}, {since:.1f} s since the last report"
    )


def _evaluate(model, eval_dirs: dict[str, str], rows: int, device) -> dict[str, float]:
    """Eval loss per split, measured as `mixloop eval` measures a published version."""
    inner = unwrapped(model)
    training = inner.training
    inner.eval()
    losses = {name: evaluate_model(inner, folder, rows, device)["loss"] for name, folder in eval_dirs.items()}
    inner.train(training)
    return losses


def _peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch on GPU, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _progress_line(m: MetricsRecord) -> str:
    corpora = " ".join(f"{n} {v:.3f}" for n, v in m.loss_per_corpus.items())
    return (
        f"[{m.stage}] step {m.step}/{m.total_steps} loss {m.loss:.3f} ({corpora}) lr {m.lr:.2e} "
        f"{m.tokens_per_s:,.0f} tok/s ETA {m.eta}"
    )
