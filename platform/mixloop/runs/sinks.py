"""Tracker sinks: where the driver's metrics go besides metrics.jsonl (see runs.tracking).

- TensorBoard, on by default: one run per stage under <workdir>/tensorboard/;
- MLflow: one parent run per pipeline run, a nested run per stage (and per evaluated version);
- Weights & Biases: one run per stage, grouped by pipeline (online, or offline files to sync later).

A new tracker is a new class with the `TrackerSink` methods; `Trackers.of` picks them from the spec.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from mixloop.storage.fs import LOCAL_CACHE, is_local, local_copy, upload
from mixloop.storage.layout import Workdir

if TYPE_CHECKING:  # optional dependencies (mixloop[mlflow], mixloop[wandb]): imported where a tracker starts
    from mlflow.entities import RunInfo
    from mlflow.tracking import MlflowClient
    from wandb import Run


class TrackerSink(Protocol):
    """One experiment tracker. A run is a stage, a tuning trial or an evaluated version; a step is the
    pipeline's cumulative trained tokens."""

    def params(self, run: str, params: dict) -> None:
        """A run's settings (a stage's resolved settings, a version's lineage summary)."""

    def log(self, run: str, values: dict[str, float], step: int) -> None:
        """Scalars of a run at a step."""

    def flush(self) -> None:
        """Send what was logged (called after every forward)."""

    def close(self, report_dir: str | None) -> None:
        """End every run; attach the report, if there is one."""


def flat(params: dict, prefix: str = "") -> dict[str, str]:
    """{"lr": {"peak": 1e-3}} -> {"lr.peak": "0.001"}: params as trackers keep them."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


def _local_folder(target: str) -> Path:
    """A workdir's folder itself when it is local; for one on object storage, a folder here (uploaded after)."""
    if is_local(target):
        return Path(target.removeprefix("file://"))
    return LOCAL_CACHE / hashlib.sha256(target.encode()).hexdigest()[:20]  # one per target


class TensorBoard:
    """Event files under <workdir>/tensorboard/<run>/ (for a workdir on object storage: written here and
    uploaded after each forward). TensorBoard has no params: they are left out."""

    def __init__(self, workdir: str):
        self.target = Workdir(workdir).tensorboard
        self.root = _local_folder(self.target)
        self.writers: dict = {}

    def params(self, run: str, params: dict) -> None:
        pass

    def log(self, run: str, values: dict[str, float], step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: torch

        if run not in self.writers:
            self.writers[run] = SummaryWriter(log_dir=str(self.root / run), flush_secs=5)
        for name, value in values.items():
            self.writers[run].add_scalar(name, value, global_step=step)

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()
        if not is_local(self.target) and self.root.exists():
            upload(str(self.root), self.target)

    def close(self, report_dir: str | None) -> None:
        self.flush()


class MLflow:
    """A parent run per pipeline run (the report as its artifacts), a nested run per stage or version."""

    def __init__(self, tracking_uri: str, experiment: str, pipeline: str):
        # A server that is down must cost a report seconds, not the client's minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.tracking_uri, self.experiment, self.pipeline = tracking_uri, experiment, pipeline
        self.client: MlflowClient | None = None
        self.parent: RunInfo | None = None
        self.runs: dict[str, str] = {}  # run name -> MLflow run id

    def _run(self, name: str) -> tuple[MlflowClient, str]:
        """The client and the id of the run `name`, both made at their first use."""
        from mlflow.tracking import MlflowClient  # lazy: optional dependency, mixloop[mlflow]

        if self.client is None:
            self.client = MlflowClient(self.tracking_uri)
        if self.parent is None:
            found = self.client.get_experiment_by_name(self.experiment)
            experiment = found.experiment_id if found else self.client.create_experiment(self.experiment)
            self.parent = self.client.create_run(
                experiment, run_name=self.pipeline, tags={"mixloop.pipeline": self.pipeline}
            ).info
        if name not in self.runs:
            self.runs[name] = self.client.create_run(
                self.parent.experiment_id,
                run_name=name,
                tags={"mlflow.parentRunId": self.parent.run_id, "mixloop.pipeline": self.pipeline},
            ).info.run_id
        return self.client, self.runs[name]

    def params(self, run: str, params: dict) -> None:
        from mlflow.entities import Param  # lazy: optional dependency, mixloop[mlflow]

        client, run_id = self._run(run)
        client.log_batch(run_id, params=[Param(key, value[:6000]) for key, value in flat(params).items()])

    def log(self, run: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # lazy: optional dependency, mixloop[mlflow]

        (client, run_id), now = self._run(run), int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def flush(self) -> None:
        pass

    def close(self, report_dir: str | None) -> None:
        if self.client is None or self.parent is None:
            return
        if report_dir is not None:
            self.client.log_artifacts(self.parent.run_id, local_copy(report_dir), "report")
        for run_id in [*self.runs.values(), self.parent.run_id]:
            self.client.set_terminated(run_id)
        self.parent, self.runs = None, {}


class WandB:
    """A run per stage or version, grouped by pipeline; offline runs are written under <workdir>/wandb/."""

    def __init__(
        self, project: str, mode: Literal["online", "offline"], entity: str | None, pipeline: str, workdir: str
    ):
        self.project, self.mode, self.entity, self.pipeline = project, mode, entity, pipeline
        self.dir = _local_folder(Workdir(workdir).wandb)
        self.runs: dict[str, Run] = {}

    def _run(self, name: str, params: dict[str, Any] | None = None) -> Run:
        import wandb  # lazy: optional dependency, mixloop[wandb]

        if name not in self.runs:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.runs[name] = wandb.init(
                project=self.project,
                entity=self.entity,
                name=name,
                group=self.pipeline,
                mode=self.mode,
                dir=str(self.dir),
                config=params,
                reinit="create_new",
            )
        return self.runs[name]

    def params(self, run: str, params: dict) -> None:
        if run in self.runs:
            self.runs[run].config.update(params, allow_val_change=True)
        else:
            self._run(run, params)

    def log(self, run: str, values: dict[str, float], step: int) -> None:
        self._run(run).log(values, step=step)

    def flush(self) -> None:
        pass

    def close(self, report_dir: str | None) -> None:
        for run in self.runs.values():
            run.finish()
        self.runs = {}
