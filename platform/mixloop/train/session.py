"""Where the training loop runs: its rank, device, reports and checkpoints. A stage runs on a Ray
Train worker group (`WorkerGroup`); a tuning trial of one worker runs in its Ray Tune trial's own
process (`TuneTrial`), so it pays no Ray Train start-up (controller, worker actors, imports: some
15 s a trial on a 2-core machine) before training for a few seconds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from mixloop.errors import MixloopError


class TrainingSession(Protocol):
    """What the training loop asks of the place it runs in (train.loop.run_stages)."""

    rank: int
    world: int
    device: torch.device
    run: str | None
    """The Ray Train run name that checkpoints restored here belong to (None: every one is this run's)."""

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this rank's device (wrapped for data parallelism where there are several ranks)."""

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None) -> None:
        """Report a window's metrics, with a checkpoint folder to keep (under `name`), if any."""

    def latest_checkpoint(self) -> Any:
        """The checkpoint to resume from (a Ray Train or Tune Checkpoint), or None."""

    def preemption(self) -> Any:
        """Ray's notice that a node is about to be reclaimed, or None."""


class WorkerGroup:
    """A rank of a Ray Train worker group. Reports are a barrier across the group."""

    def __init__(self):
        # lazy: ray
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device, self.run = ray.train.torch.get_device(), context.get_experiment_name()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this rank's device, wrapped for DDP when there are several ranks."""
        import ray.train.torch  # lazy: ray

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None) -> None:
        import ray.train  # lazy: ray

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def latest_checkpoint(self):
        import ray.train  # lazy: ray

        return ray.train.get_checkpoint()

    def preemption(self):
        """Ray's notice that a node of the group is about to be reclaimed (a broadcast: every rank asks)."""
        import ray.train  # lazy: ray

        return ray.train.get_preemption_info()


class TuneTrial:
    """A tuning trial trained in its Ray Tune trial's process, alone. Reports that carry an eval go to
    Tune as `row(metrics)`, with their checkpoint (Tune keeps them, and restores the latest when the
    trial or the search starts again); the final one is the trial's to report. `last` holds the
    latest metrics reported."""

    rank, world = 0, 1
    run: str | None = None  # every checkpoint Tune restores names its trial's run

    def __init__(self, row: Callable[[dict], dict], use_gpu: bool):
        if use_gpu and not torch.cuda.is_available():
            raise MixloopError(
                "the trial asks for a GPU (use_gpu) but its process sees none. Fix: run the search "
                "on a cluster with GPUs, or set use_gpu: false."
            )
        self.row = row
        self.last: dict | None = None
        self.device = torch.device("cuda" if use_gpu else "cpu")

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None) -> None:
        from ray import tune  # lazy: ray

        self.last = metrics
        if "eval_loss" in metrics and metrics["step"] < metrics["total_steps"]:
            checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            tune.report(self.row(metrics), checkpoint=checkpoint)

    def latest_checkpoint(self):
        from ray import tune  # lazy: ray

        return tune.get_checkpoint()

    def preemption(self):
        return None
