"""A stage's training state, and its checkpoints: Hugging Face weights (fp32) with the optimizer, the
RNG and the step, saved through Ray Train's report and restored from it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from mixloop.config import ResolvedStage
from mixloop.storage.fs import upload
from mixloop.train.job import StageJob
from mixloop.train.model import load_model
from mixloop.train.session import TrainingSession

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


def checkpoint_dir_name(run: str, step: int) -> str:
    """The folder of the checkpoint at `step` of the stage whose own run name is `run`, inside its
    group's Ray Train run (which holds several stages' checkpoints, and an edited stage's too)."""
    return f"{run}.step-{step:07d}"


@dataclass
class TrainState:
    """Where a stage stands: its step, the learning rate of that step, the tokens trained per corpus
    of its mixture (in mixture order), and what this run resumed from."""

    step: int
    lr: float
    tokens: list[float]
    resumed_from: int | None = None
    skipped_steps: int = 0
    run: str | None = None
    """The own run name of the stage it belongs to (StageJob.run; None in checkpoints of runs that
    trained one stage, before groups)."""

    @classmethod
    def fresh(cls, job: StageJob, start_lr: float) -> TrainState:
        return cls(step=0, lr=start_lr, tokens=[0.0] * len(job.stage.mixture), run=job.run)

    def add_tokens(self, tokens) -> None:
        self.tokens = [before + float(added) for before, added in zip(self.tokens, tokens)]

    def as_json(self) -> dict:
        return asdict(self)


def read_state(checkpoint_dir: str) -> TrainState:
    data = json.loads(Path(checkpoint_dir, STATE_FILE).read_text())
    return TrainState(**{key: data[key] for key in TrainState.__dataclass_fields__ if key in data})


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


def optimizer_for(model, stage: ResolvedStage, device) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases (1-D parameters)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=stage.lr.peak, betas=(0.9, 0.95), fused=device.type == "cuda")


@dataclass
class Start:
    """Where a worker starts a stage: a model, and either the state restored from a checkpoint (with the
    optimizer's and the RNG's) or none (a fresh state)."""

    model: torch.nn.Module
    state: TrainState | None = None
    optimizer_state: dict | None = None
    rng: dict | None = None


def latest_start(session: TrainingSession, trust_remote_code: bool) -> Start | None:
    """The latest checkpoint Ray hands this run (after a restart or a resumed driver), loaded on the
    session's device; or None."""
    checkpoint, device = session.latest_checkpoint(), session.device
    if checkpoint is None:
        return None
    with restored(checkpoint) as source:
        state = read_state(source)
        state.resumed_from = state.step
        return Start(
            load_model(source, trust_remote_code).to(device),
            state,
            torch.load(Path(source, OPTIMIZER_FILE), weights_only=True, map_location=device),
            torch.load(Path(source, RNG_FILE), weights_only=True),
        )


class Checkpointer:
    """Sets a worker's model, optimizer and state up at the start of a stage, and saves checkpoints."""

    def __init__(self, job: StageJob, session: TrainingSession):
        self.job, self.session, self.device, self.rank = job, session, session.device, session.rank

    def start(self, start: Start | None):
        """(model, optimizer, state): from `start` (a checkpoint of this stage, or the model the previous
        stage of the group ended with), else from the parent version."""
        if start is None:
            start = Start(load_model(self.job.parent_dir, self.job.trust_remote_code).to(self.device))
        optimizer = optimizer_for(start.model, self.job.stage, self.device)
        if start.state is None or start.optimizer_state is None or start.rng is None:  # (a checkpoint has all three)
            return start.model, optimizer, TrainState.fresh(self.job, self.job.start_lr)
        optimizer.load_state_dict(start.optimizer_state)
        torch.set_rng_state(start.rng["cpu"])
        if start.rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(start.rng["cuda"])
        return start.model, optimizer, start.state

    def save(self, model, optimizer, state: TrainState, metrics: dict) -> None:
        """Every rank reports (it is a barrier); rank 0 attaches the checkpoint, in fp32, HF format. At
        the stage's last step rank 0 first leaves its weights and state in the job's final_dir, where the
        driver publishes them from (the group's later checkpoints replace this stage's in Ray's run); so
        a final checkpoint Ray hands back always has them there."""
        if self.rank != 0:
            self.session.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            unwrapped(model).save_pretrained(folder, safe_serialization=True)
            Path(folder, STATE_FILE).write_text(json.dumps(state.as_json()))
            if state.step == self.job.stage.total_steps and self.job.final_dir is not None:
                upload(folder, self.job.final_dir, last=STATE_FILE)
            torch.save(optimizer.state_dict(), os.path.join(folder, OPTIMIZER_FILE))
            torch.save(
                {
                    "cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
                os.path.join(folder, RNG_FILE),
            )
            self.session.report(metrics, folder, checkpoint_dir_name(self.job.run, state.step))


def unwrapped(model: torch.nn.Module) -> PreTrainedModel:
    """The model inside a DistributedDataParallel wrapper (or the model): a transformers model."""
    inner = model.module if hasattr(model, "module") else model
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"a transformers model was expected, not {type(inner).__name__}")
    return inner
