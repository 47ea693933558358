"""The one training loop every stage runs, on each Ray Train worker.

A step trains one global batch of `rows_per_step` packed rows chosen by the mix
plan. The batch is cut into micro-batches; worker r of W takes micro-batches
r, r+W, ... and accumulates, so the trajectory does not depend on W. The
loop's position is the step alone: a restart at any world size reads the same
rows from the plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from mixloop.data.mixplan import MixPlan
from mixloop.data.packing import model_inputs
from mixloop.data.store import PackedCorpus
from mixloop.storage import append_line, read_lines
from mixloop.errors import MixloopError
from mixloop.model import load_model
from mixloop.train.loss import corpus_token_weights, token_ce
from mixloop.train.schedule import learning_rate

STATE_FILE = "trainer_state.json"
FAULT_NAN_STEPS = "MIXLOOP_FAULT_NAN_STEPS"  # comma-separated steps whose loss is made NaN (tests)
FAULT_STEP_SECONDS = "MIXLOOP_FAULT_STEP_SECONDS"  # extra seconds per step, so tests can act mid-stage
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


class StageJob(BaseModel):
    """What the driver hands every worker, as plain JSON."""

    model_config = ConfigDict(extra="forbid")
    pipeline: str
    stage: dict
    corpus_dirs: dict[str, str]
    parent_dir: str
    start_lr: float
    total_steps: int
    rows_per_step: int
    metrics_path: str
    trust_remote_code: bool = False
    evals: dict[str, str] | None = None
    """Eval split folders to measure at every checkpoint (tuning trials report them to Ray Tune)."""
    eval_rows: int = 0
    progress_lines: bool = True


class Progress:
    """Sums that are all-reduced at each report: loss and supervised tokens per corpus, tokens seen."""

    def __init__(self, corpora: int, device):
        self.corpora, self.device = corpora, device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros(self.corpora, dtype=torch.float64)
        self.supervised = torch.zeros(self.corpora, dtype=torch.float64)
        self.tokens = torch.zeros(self.corpora, dtype=torch.float64)

    def reduced(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        packed = all_reduce(torch.stack([self.loss, self.supervised, self.tokens]), self.device)
        self.reset()
        return packed[0], packed[1], packed[2]


def all_reduce(tensor: torch.Tensor, device) -> torch.Tensor:
    """Sum over workers. NCCL reduces only device tensors, so the sum travels through the device."""
    if not dist.is_initialized():
        return tensor
    on_device = tensor.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()


def train_stage(config: dict) -> dict:
    """Ray Train's train_loop_per_worker."""
    import ray.train
    import ray.train.torch

    job = StageJob.model_validate(config)
    stage = job.stage
    _quiet_report_lines()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(stage["cpus_per_worker"])))
    device = ray.train.torch.get_device()
    names = list(stage["mixture"])
    corpora = [PackedCorpus(job.corpus_dirs[name]) for name in names]
    plan = MixPlan.for_stage(stage, {n: len(c) for n, c in zip(names, corpora)}, job.total_steps * job.rows_per_step)

    model, optimizer, state = _start(job, device)
    model = ray.train.torch.prepare_model(model)
    step_trainer = StepTrainer(job, model, optimizer, names, world, device)
    loader = StepLoader(plan, corpora, job, micro_batches_of(rank, world, job.rows_per_step // stage["micro_batch_rows"]),
                        pin_memory=device.type == "cuda")
    progress, timer = Progress(len(names), device), StepTimer()
    if rank == 0 and state["resumed_from"] is not None:
        print(_resume_line(job, state["step"]), flush=True)
    window_start, window_step, row_hashes = time.time(), state["step"], {}
    preemption = PreemptionCheck(stage["name"], rank)
    slow_down = float(os.environ.get(FAULT_STEP_SECONDS, 0))

    for step in range(state["step"], job.total_steps):
        time.sleep(slow_down)
        lr = learning_rate(step, job.total_steps, stage["lr"], job.start_lr)
        with timer("data"):
            batch = loader.get(step)
        row_hashes[step + 1] = batch.row_hash
        grad_norm = step_trainer.step(batch, lr, progress, step, timer)
        if not math.isfinite(grad_norm):
            if stage["nonfinite"] == "stop":
                raise NonFiniteError(f"stage {stage['name']}: non-finite loss or gradient at step {step + 1}. "
                                     "Its last good checkpoint is kept. Fix: lower lr.peak or set nonfinite: skip.")
            state["skipped_steps"] = state.get("skipped_steps", 0) + 1
        state["step"], state["lr"] = step + 1, lr

        last = state["step"] == job.total_steps
        if state["step"] % stage["log_every"] == 0 or state["step"] % stage["checkpoint_every"] == 0 or last:
            metrics = _metrics(job, names, progress, state, lr, grad_norm, window_start, window_step)
            metrics.update(row_hashes=row_hashes, workers=world, **timer.per_step(state["step"] - window_step))
            row_hashes, window_start, window_step = {}, time.time(), state["step"]
            with timer("report"):  # counted in the next window
                if rank == 0:
                    append_line(job.metrics_path, json.dumps(metrics))
                    if job.progress_lines:
                        print(_progress_line(metrics, job.total_steps), flush=True)
                noticed = preemption.noticed(state["step"])  # a collective: every rank, every report
                if state["step"] % stage["checkpoint_every"] == 0 or last or noticed:
                    if job.evals and rank == 0:  # the other ranks wait at the report's barrier
                        metrics["eval_loss"] = _evaluate(model, job.evals, job.eval_rows, device)
                    _checkpoint(model, optimizer, state, metrics, rank)
    loader.close()
    return {"steps": state["step"], "final_lr": state["lr"], "tokens": dict(zip(names, state["tokens"])),
            "resumed_from": state["resumed_from"], "skipped_steps": state.get("skipped_steps", 0)}


def _quiet_report_lines() -> None:
    """Ray Train 2.60 logs every report, metrics and all, at INFO through a logger named after its
    file, which LoggingConfig does not reach; the progress lines say the same in one line."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class StepTimer:
    """Seconds spent per kind of work (data, compute, sync, report), summed until read."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, kind: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.totals[kind] = self.totals.get(kind, 0.0) + time.perf_counter() - started

    def per_step(self, steps: int) -> dict[str, float]:
        """{kind}_s: mean seconds per step since the last read."""
        means = {f"{kind}_s": total / max(steps, 1) for kind, total in self.totals.items()}
        self.totals = {}
        return means


class StepBatch(NamedTuple):
    corpus_of_row: np.ndarray  # corpus of every row of the global batch
    row_hash: str  # identity of the global batch's rows
    micro_batches: list["MicroBatch"]  # this worker's share, ready for the model


class StepLoader:
    """This worker's micro-batches of each global batch, the next one read in a background thread
    while the current one trains (numpy and torch release the GIL while they copy)."""

    def __init__(self, plan: MixPlan, corpora, job: StageJob, mine: list[int], pin_memory: bool):
        self.plan, self.corpora, self.rows_per_step, self.mine = plan, corpora, job.rows_per_step, mine
        self.micro, self.total_steps, self.pin_memory = job.stage["micro_batch_rows"], job.total_steps, pin_memory
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mixloop-loader")
        self.pending: tuple[int, Future] | None = None

    def get(self, step: int) -> StepBatch:
        if self.pending is not None and self.pending[0] == step:
            batch = self.pending[1].result()
        else:
            batch = self.load(step)
        self.pending = (step + 1, self.pool.submit(self.load, step + 1)) if step + 1 < self.total_steps else None
        return batch

    def load(self, step: int) -> StepBatch:
        corpus, index = self.plan.rows(step * self.rows_per_step, (step + 1) * self.rows_per_step)
        micro = self.micro
        batches = [MicroBatch(self.corpora, corpus[i * micro:(i + 1) * micro], index[i * micro:(i + 1) * micro],
                              self.pin_memory) for i in self.mine]
        return StepBatch(corpus, row_hash(corpus, index), batches)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class PreemptionCheck:
    """Asks Ray, at every report, whether a node of this group is about to be reclaimed (a spot
    preemption notice). On a new notice the stage checkpoints at once and trains on; Ray restarts
    the group when the node goes, and the restart loses no step."""

    def __init__(self, stage: str, rank: int):
        self.stage, self.rank, self.seen = stage, rank, set()

    def noticed(self, step: int) -> bool:
        import ray.train

        info = ray.train.get_preemption_info()  # a broadcast from rank 0: every rank calls it
        nodes = set(info.preempted_node_ids) if info is not None else set()
        if not nodes - self.seen:
            return False
        self.seen |= nodes
        if self.rank == 0:
            deadline = max(info.deadline_ms / 1000 - time.time(), 0) if info.deadline_ms else None
            print(f"[{self.stage}] preemption notice for node(s) {', '.join(sorted(n[:8] for n in nodes))}"
                  + (f", {deadline:.0f} s left" if deadline is not None else "")
                  + f": checkpointing at step {step}", flush=True)
        return True


class StepTrainer:
    """One optimizer step: this worker's micro-batches of the global batch, accumulated."""

    def __init__(self, job: StageJob, model, optimizer, names: list[str], world: int, device):
        self.job, self.model, self.optimizer, self.world, self.device = job, model, optimizer, world, device
        stage = job.stage
        self.loss_weights = torch.tensor([stage["loss_weights"][n] for n in names], dtype=torch.float64)
        self.corpora = len(names)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if stage["use_gpu"] else nullcontext()
        self.nan_steps = {int(s) for s in os.environ.get(FAULT_NAN_STEPS, "").split(",") if s}

    def step(self, batch: StepBatch, lr: float, progress: Progress, step: int, timer: StepTimer) -> float:
        """Train one step; returns the gradient norm (not finite: nothing was applied). DDP's gradient
        all-reduce overlaps the last backward pass and is timed as compute; sync is the explicit
        all-reduce of the batch's per-corpus token counts."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with timer("sync"):
            weights = _token_weights(batch.micro_batches, batch.corpus_of_row, self.corpora, self.loss_weights,
                                     self.job.stage["balance"], self.device)
        with timer("compute"):
            losses = [self._backward(micro_batch, weights, step, last=position == len(batch.micro_batches) - 1)
                      for position, micro_batch in enumerate(batch.micro_batches)]
            # After DDP's all-reduce every worker holds the same gradients, so all take the same decision.
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.job.stage["grad_clip"]))
            if math.isfinite(grad_norm):
                self.optimizer.step()
                for ce, micro_batch in zip(losses, batch.micro_batches):
                    _accumulate(progress, ce, micro_batch)
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _backward(self, micro_batch: "MicroBatch", weights: torch.Tensor, step: int, last: bool) -> torch.Tensor:
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in micro_batch.inputs.items()}
        labels = inputs.pop("labels")
        with nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync():
            with self.autocast:
                ce = token_ce(self.model(**inputs).logits, labels)
            if step + 1 in self.nan_steps:  # fault injection for tests: a batch whose loss is NaN
                ce = ce * float("nan")
            per_token = weights[micro_batch.corpus.to(self.device)][:, None] * (labels != -100)
            # DDP averages gradients over workers; the loss is a sum over all of them.
            (ce * per_token).sum().mul(self.world).backward()
        return ce.detach().double().cpu()


def micro_batches_of(rank: int, world: int, micro_batches: int) -> list[int]:
    """Which micro-batches of every global batch a worker trains: every world-th one from its rank.
    Together the workers cover each global batch exactly once, whatever their number."""
    return list(range(rank, micro_batches, world))


def row_hash(corpus_of_row: np.ndarray, row_index: np.ndarray) -> str:
    """Identity of the rows one global step trains, to compare runs step by step."""
    ids = np.stack([np.asarray(corpus_of_row, np.int64), np.asarray(row_index, np.int64)])
    return hashlib.sha256(ids.tobytes()).hexdigest()[:16]


def _resume_line(job: StageJob, step: int) -> str:
    """What a restart cost: steps trained since the checkpoint (to redo) and time since the last report."""
    logged = [json.loads(line) for line in read_lines(job.metrics_path)]
    logged = [m for m in logged if m["stage"] == job.stage["name"]]
    redo = max([m["step"] for m in logged] + [step]) - step
    since = time.time() - logged[-1]["time"] if logged else 0.0
    lost = f"{redo} logged step(s) to redo" if redo else "no logged step lost"
    return (f"[{job.stage['name']}] resumed from checkpoint at step {step}/{job.total_steps}: "
            f"{lost}, {since:.1f} s since the last report")


class MicroBatch:
    def __init__(self, corpora, corpus_of_row: np.ndarray, row_index: np.ndarray, pin_memory: bool = False):
        length = corpora[0].seq_len
        tokens = np.empty((len(row_index), length), np.int32)
        supervised = np.empty((len(row_index), length), bool)
        segments = np.empty((len(row_index), length), np.int16)
        for c in np.unique(corpus_of_row):
            picked = corpus_of_row == c
            tokens[picked], supervised[picked], segments[picked] = corpora[c].read(row_index[picked])
        self.inputs = model_inputs(tokens, supervised, segments)
        if pin_memory:  # page-locked host memory lets the copy to the GPU run asynchronously
            self.inputs = {k: v.pin_memory() for k, v in self.inputs.items()}
        self.corpus = torch.as_tensor(corpus_of_row, dtype=torch.long)
        self.targets = (self.inputs["labels"] != -100).sum(1).double()  # supervised targets per row
        self.real_tokens = torch.as_tensor((segments > 0).sum(1), dtype=torch.float64)


def _token_weights(batches, corpus_of_row, corpora: int, loss_weights, balance, device) -> torch.Tensor:
    """Per-corpus token weights from global counts: supervised tokens are summed across workers."""
    supervised = torch.zeros(corpora, dtype=torch.float64)
    for batch in batches:
        supervised.index_add_(0, batch.corpus, batch.targets)
    supervised = all_reduce(supervised, device)
    rows = torch.bincount(torch.as_tensor(corpus_of_row), minlength=corpora)
    return corpus_token_weights(supervised, rows, loss_weights, balance).float().to(device)


def _accumulate(progress: Progress, ce: torch.Tensor, batch: "MicroBatch") -> None:
    progress.loss.index_add_(0, batch.corpus, ce.sum(1))
    progress.supervised.index_add_(0, batch.corpus, batch.targets)
    progress.tokens.index_add_(0, batch.corpus, batch.real_tokens)


class NonFiniteError(MixloopError):
    """Training met a non-finite loss or gradient and the stage says to stop."""


def _metrics(job, names, progress, state, lr, grad_norm, window_start, window_step) -> dict:
    loss, supervised, tokens = progress.reduced()
    state["tokens"] = [a + float(b) for a, b in zip(state["tokens"], tokens)]
    elapsed = time.time() - window_start
    steps = max(state["step"] - window_step, 1)
    per_corpus = {n: float(l / s) for n, l, s in zip(names, loss, supervised) if s > 0}
    return {
        "stage": job.stage["name"], "step": state["step"], "total_steps": job.total_steps, "lr": lr,
        "loss": float(loss.sum() / supervised.sum().clamp(min=1)), "loss_per_corpus": per_corpus,
        "grad_norm": grad_norm, "skipped_steps": state.get("skipped_steps", 0),
        "tokens_per_s": float(tokens.sum()) / max(elapsed, 1e-9),
        "step_seconds": elapsed / steps, "tokens": dict(zip(names, state["tokens"])), "time": time.time(),
        "peak_memory_mb": _peak_memory_mb(),
    }


def _evaluate(model, eval_dirs: dict[str, str], rows: int, device) -> dict[str, float]:
    """Eval loss per split, measured as `mixloop eval` measures a published version."""
    from mixloop.evaluate import evaluate_model

    unwrapped = model.module if hasattr(model, "module") else model
    training = unwrapped.training
    unwrapped.eval()
    losses = {name: evaluate_model(unwrapped, folder, rows, device)["loss"] for name, folder in eval_dirs.items()}
    unwrapped.train(training)
    return losses


def _peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch on GPU, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _progress_line(m: dict, total: int) -> str:
    eta = int(m["step_seconds"] * (total - m["step"]))
    corpora = " ".join(f"{n} {v:.3f}" for n, v in m["loss_per_corpus"].items())
    return (f"[{m['stage']}] step {m['step']}/{total} loss {m['loss']:.3f} ({corpora}) lr {m['lr']:.2e} "
            f"{m['tokens_per_s']:,.0f} tok/s ETA {eta // 60}:{eta % 60:02d}")


def _start(job: StageJob, device):
    """From the stage's latest checkpoint if Ray hands one, else from the parent version."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        state = {"step": 0, "lr": job.start_lr, "tokens": [0.0] * len(job.stage["mixture"]), "resumed_from": None}
        model = load_model(job.parent_dir, job.trust_remote_code).to(device)
        return model, _optimizer(model, job.stage, device), state
    with restored(checkpoint) as source:
        state = json.loads((Path(source) / STATE_FILE).read_text())
        state["resumed_from"] = state["step"]
        model = load_model(source, job.trust_remote_code).to(device)
        optimizer = _optimizer(model, job.stage, device)
        optimizer.load_state_dict(torch.load(Path(source) / OPTIMIZER_FILE, weights_only=True, map_location=device))
        rng = torch.load(Path(source) / RNG_FILE, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return model, optimizer, state


@contextmanager
def restored(checkpoint):
    """A checkpoint's files in a folder of this process's own, deleted afterwards. Ray's
    `to_directory()` without a path gives every process of a node one shared folder, and a process
    arriving after the first download has finished downloads again over files that others have
    memory-mapped (safetensors): they die with SIGBUS. A private folder cannot be overwritten."""
    folder = tempfile.mkdtemp(prefix=f"mixloop-restore-{os.getpid()}-")
    try:
        yield checkpoint.to_directory(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _optimizer(model, stage: dict, device) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases (1-D parameters)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": stage["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=stage["lr"]["peak"], betas=(0.9, 0.95), fused=device.type == "cuda")


def _checkpoint(model, optimizer, state: dict, metrics: dict, rank: int) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint, in fp32, HF format."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        unwrapped = model.module if hasattr(model, "module") else model
        unwrapped.save_pretrained(folder, safe_serialization=True)
        torch.save(optimizer.state_dict(), os.path.join(folder, OPTIMIZER_FILE))
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   os.path.join(folder, RNG_FILE))
        Path(folder, STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"step-{state['step']:07d}")
