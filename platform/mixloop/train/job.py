"""What the driver hands every worker of a stage: built once by `stage_job`, crossing to Ray Train's
workers as JSON and validated back into this type on the other side."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from mixloop.config import ResolvedStage


class StageJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: str
    stage: ResolvedStage
    corpus_dirs: dict[str, str]
    """Packed train split of every corpus of the stage's mixture."""
    parent_dir: str
    """The version the stage starts from."""
    start_lr: float
    """Where the warmup starts: the parent's final learning rate (warmup_from: current) or 0."""
    metrics_path: str
    run: str = ""
    """The stage's own run name (train.launch.run_name; a trial's id): its identity in a group's Ray
    Train run, which its checkpoints carry."""
    final_dir: str | None = None
    """Where rank 0 leaves the stage's final weights and state for the driver to publish."""
    trust_remote_code: bool = False
    evals: dict[str, str] | None = None
    """Eval split folders to measure at every checkpoint (tuning trials report them to Ray Tune)."""
    eval_rows: int = 0
    progress_lines: bool = True

    def as_json(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


def stage_job(
    pipeline: str,
    stage: ResolvedStage,
    parent_final_lr: float,
    parent_dir: str,
    corpus_dirs: dict[str, str],
    metrics_path: str,
    trust_remote_code: bool = False,
    **extra,
) -> StageJob:
    """The job of a resolved stage that starts from the version in `parent_dir`, whose stage ended at
    the learning rate `parent_final_lr`."""
    return StageJob(
        pipeline=pipeline,
        stage=stage,
        corpus_dirs={n: corpus_dirs[n] for n in stage.mixture},
        parent_dir=parent_dir,
        metrics_path=metrics_path,
        trust_remote_code=trust_remote_code,
        start_lr=parent_final_lr if stage.lr.warmup_from == "current" else 0.0,
        **extra,
    )


def same_workers(a: ResolvedStage, b: ResolvedStage) -> bool:
    """Whether two stages ask for the same worker group, so one group can train both in turn."""
    keys = (
        "min_workers",
        "max_workers",
        "cpus_per_worker",
        "use_gpu",
        "resources_per_worker",
        "resize_every_s",
        "max_failures",
    )
    return all(getattr(a, key) == getattr(b, key) for key in keys)
