"""Run a stage, or a group of consecutive stages, on one Ray Train worker group."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import ray.train

# Train V2's names, which ray.train and ray.train.torch export at run time (2.60); their static types
# are V1's (no elastic or logging settings), which Ray keeps for V2 turned off.
from ray.train.v2.api.config import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.v2.api.exceptions import TrainingFailedError
from ray.train.v2.torch.torch_trainer import TorchTrainer

from mixloop.errors import MixloopError
from mixloop.storage.fs import train_storage
from mixloop.train.job import StageJob
from mixloop.train.loop import train_stages
from mixloop.train.step import StepHooks


def run_name(pipeline: str, stage: str, stage_hash: str, corpus_dirs: dict[str, str]) -> str:
    """Deterministic, so a restarted driver resumes the stage. The stage hash and the packed corpora's
    keys keep an edited stage, or one whose files changed, from resuming checkpoints that followed
    another sequence of rows."""
    data = hashlib.sha256(json.dumps(sorted(Path(d).name for d in corpus_dirs.values())).encode()).hexdigest()
    return f"{pipeline}.{stage}.{stage_hash}.{data[:8]}"


def fit_stages(
    jobs: list[StageJob],
    storage: str,
    name: str,
    in_process: bool = False,
    callbacks: list | None = None,
    hooks: StepHooks | None = None,
) -> ray.train.Result:
    """Train stages in turn on one group of Ray Train workers (they must ask for the same workers, see
    job.same_workers) as the run `name` under the folder or URI `storage` (the same name resumes from
    its latest checkpoint); `in_process` runs the same loop in this process instead (Ray Train's local
    mode), which the training benchmark uses to measure Ray's overhead. `hooks`: tests' way into the
    step loop (pickled with the config; none in production)."""
    stage = jobs[0].stage
    storage_path, storage_filesystem = train_storage(storage)
    elastic = stage.min_workers != stage.max_workers
    workers = 0 if in_process else (stage.min_workers, stage.max_workers) if elastic else stage.max_workers
    trainer = TorchTrainer(
        train_stages,
        train_loop_config={"jobs": [job.as_json() for job in jobs], "hooks": hooks},
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=stage.use_gpu,
            resources_per_worker={"CPU": stage.cpus_per_worker, **stage.resources_per_worker},
            elastic_resize_monitor_interval_s=stage.resize_every_s,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=stage.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines (one per report and rank) would drown the progress lines,
            # and its print patch would show each of them twice.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            callbacks=callbacks,
        ),
    )
    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        for failure in getattr(exc, "worker_failures", {}).values():
            user_error = _find_user_error(failure)
            if user_error is not None:
                raise user_error from None
        raise


def _find_user_error(error: BaseException | None) -> MixloopError | None:
    while error is not None:
        if isinstance(error, MixloopError):
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None
