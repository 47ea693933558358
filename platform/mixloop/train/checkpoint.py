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

from mixloop.model import load_model
from mixloop.spec import ResolvedStage
from mixloop.train.job import StageJob

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


def checkpoint_dir_name(step: int) -> str:
    """The folder of a stage's checkpoint at `step` inside its Ray Train run."""
    return f"step-{step:07d}"


@dataclass
class TrainState:
    """Where a stage stands: its step, the learning rate of that step, the tokens trained per corpus
    of its mixture (in mixture order), and what this run resumed from."""

    step: int
    lr: float
    tokens: list[float]
    resumed_from: int | None = None
    skipped_steps: int = 0

    @classmethod
    def fresh(cls, corpora: int, start_lr: float) -> "TrainState":
        return cls(step=0, lr=start_lr, tokens=[0.0] * corpora)

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


class Checkpointer:
    """Loads a worker's model, optimizer and state at the start of a stage, and saves checkpoints."""

    def __init__(self, job: StageJob, device, rank: int):
        self.job, self.device, self.rank = job, device, rank

    def start(self):
        """(model, optimizer, state): from the stage's latest checkpoint if Ray hands one, else from
        the parent version."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            model = load_model(self.job.parent_dir, self.job.trust_remote_code).to(self.device)
            state = TrainState.fresh(len(self.job.stage.mixture), self.job.start_lr)
            return model, optimizer_for(model, self.job.stage, self.device), state
        with restored(checkpoint) as source:
            state = read_state(source)
            state.resumed_from = state.step
            model = load_model(source, self.job.trust_remote_code).to(self.device)
            optimizer = optimizer_for(model, self.job.stage, self.device)
            optimizer.load_state_dict(torch.load(Path(source, OPTIMIZER_FILE), weights_only=True,
                                                 map_location=self.device))
            rng = torch.load(Path(source, RNG_FILE), weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return model, optimizer, state

    def save(self, model, optimizer, state: TrainState, metrics: dict) -> None:
        """Every rank reports (it is a barrier); rank 0 attaches the checkpoint, in fp32, HF format."""
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            unwrapped = model.module if hasattr(model, "module") else model
            unwrapped.save_pretrained(folder, safe_serialization=True)
            torch.save(optimizer.state_dict(), os.path.join(folder, OPTIMIZER_FILE))
            torch.save({"cpu": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                       os.path.join(folder, RNG_FILE))
            Path(folder, STATE_FILE).write_text(json.dumps(state.as_json()))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=checkpoint_dir_name(state.step))
