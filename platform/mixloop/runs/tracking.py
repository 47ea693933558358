"""Experiment trackers as sinks: metrics.jsonl stays the source of truth, and the driver forwards what
it gains (the workers' reports, while a stage trains; each version's evaluation, at the report) to the
trackers the spec names (`tracking:`):

- TensorBoard, on by default: one run per stage under <workdir>/tensorboard/;
- MLflow: one parent run per pipeline run, a nested run per stage (and per evaluated version);
- Weights & Biases: one run per stage, grouped by pipeline (online, or offline files to sync later).

Every tracker takes the pipeline's cumulative trained tokens as the step, so all stages line up in one
chart, and a stage's resolved settings as its params. A tracker that fails (a full disk, a server that
is down) never stops training: the failure is logged once, and it is tried again at the next forward.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from mixloop.storage.fs import LOCAL_CACHE, LogFollower, is_local, join, local_copy, upload

Log = Callable[[str], None]
FOLLOW_EVERY_S = 2.0


def scalars(record: dict) -> dict[str, float]:
    """The training scalars of one metrics.jsonl record, by tracker name."""
    values = {
        "train/loss": record["loss"],
        "train/lr": record["lr"],
        "train/tokens_per_s": record["tokens_per_s"],
        "train/grad_norm": record["grad_norm"],
        "train/data_wait_share": record.get("data_s", 0.0) / max(record.get("step_seconds", 0.0), 1e-9),
    }
    values.update({f"train/loss/{corpus}": loss for corpus, loss in record["loss_per_corpus"].items()})
    return {name: float(value) for name, value in values.items() if value == value}  # NaN: a skipped step


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


def _local_folder(workdir: str, name: str) -> Path:
    """<workdir>/<name> on a local workdir; for one on object storage, a folder here (uploaded after)."""
    if is_local(workdir):
        return Path(join(workdir, name).removeprefix("file://"))
    return LOCAL_CACHE / hashlib.sha256(workdir.encode()).hexdigest()[:20] / name  # one per workdir


class TensorBoard:
    """Event files under <workdir>/tensorboard/<run>/ (for a workdir on object storage: written here and
    uploaded after each forward). TensorBoard has no params: they are left out."""

    def __init__(self, workdir: str):
        self.target, self.root = join(workdir, "tensorboard"), _local_folder(workdir, "tensorboard")
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
        self.client, self.parent, self.runs = None, None, {}

    def _run(self, name: str) -> str:
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
        return self.runs[name]

    def params(self, run: str, params: dict) -> None:
        from mlflow.entities import Param  # lazy: optional dependency, mixloop[mlflow]

        run_id = self._run(run)
        self.client.log_batch(run_id, params=[Param(key, value[:6000]) for key, value in flat(params).items()])

    def log(self, run: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # lazy: optional dependency, mixloop[mlflow]

        run_id, now = self._run(run), int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def flush(self) -> None:
        pass

    def close(self, report_dir: str | None) -> None:
        if self.parent is None:
            return
        if report_dir is not None:
            self.client.log_artifacts(self.parent.run_id, local_copy(report_dir), "report")
        for run_id in [*self.runs.values(), self.parent.run_id]:
            self.client.set_terminated(run_id)
        self.parent, self.runs = None, {}


class WandB:
    """A run per stage or version, grouped by pipeline; offline runs are written under <workdir>/wandb/."""

    def __init__(self, project: str, mode: str, entity: str | None, pipeline: str, workdir: str):
        self.project, self.mode, self.entity, self.pipeline = project, mode, entity, pipeline
        self.dir, self.runs = _local_folder(workdir, "wandb"), {}

    def _run(self, name: str, params: dict | None = None):
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


class Trackers:
    """The trackers of a pipeline. `follow` forwards a training stage's new metrics lines while it
    trains; `log_versions` forwards each version's eval losses, uptake and forgetting; `close` ends the
    runs (and gives MLflow the report)."""

    def __init__(self, workdir: str, sinks: list | None = None, log: Log = print):
        self.workdir, self.log = workdir, log
        self.sinks = [TensorBoard(workdir)] if sinks is None else sinks
        self.failing: set[str] = set()

    @classmethod
    def of(cls, spec, log: Log = print) -> Trackers:
        """The trackers a spec's `tracking:` names."""
        tracking, workdir, name = spec.config.tracking, spec.workdir, spec.config.name
        sinks = [TensorBoard(workdir)] if tracking.tensorboard else []
        if tracking.mlflow is not None:
            sinks.append(MLflow(tracking.mlflow.tracking_uri, tracking.mlflow.experiment or name, name))
        if tracking.wandb is not None:
            sinks.append(WandB(tracking.wandb.project, tracking.wandb.mode, tracking.wandb.entity, name, workdir))
        return cls(workdir, sinks, log)

    def _each(self, call: Callable) -> None:
        for sink in self.sinks:
            name = type(sink).__name__
            try:
                call(sink)
                self.failing.discard(name)
            except Exception as exc:  # noqa: BLE001 -- a tracker must never stop training
                self._warn(name, exc)

    def forward(self, run: str, points: list[tuple[dict[str, float], int]]) -> None:
        """A run's (values, step) points, then one flush (for a workdir on object storage: an upload)."""

        def send(sink) -> None:
            for values, step in points:
                sink.log(run, values, step)
            sink.flush()

        if points:
            self._each(send)

    def _warn(self, name: str, exc: Exception) -> None:
        if name not in self.failing:
            self.failing.add(name)
            self.log(
                f"warning: tracker {name} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
                "training goes on, and it is tried again at the next report"
            )

    @contextmanager
    def follow(self, stages: dict[str, dict], tokens_before: float, bar: bool = False):
        """Forward the metrics lines of `stages` (name: settings, in the order they train, each the next
        one's parent) as they are appended, until the block ends (then once more), on the pipeline's axis
        of cumulative tokens from `tokens_before`. `bar`: also show them as progress bars, a stage's from
        its first line (in a terminal, instead of the workers' lines)."""
        if not self.sinks and not bar:
            yield
            return
        for stage, params in stages.items():
            self._each(lambda sink, stage=stage, params=params: sink.params(stage, params))
        metrics = LogFollower(join(self.workdir, "metrics.jsonl"))
        axis, bars = TokenAxis(list(stages), tokens_before), {}

        def forward_new() -> None:
            try:
                lines = metrics.new_lines()
            except Exception as exc:  # noqa: BLE001 -- a storage blip: the next poll reads again
                self._warn("metrics.jsonl", exc)
                return
            points: dict[str, list] = {}
            for record in (r for r in map(_record, lines) if r is not None and r.get("stage") in stages):
                points.setdefault(record["stage"], []).append((scalars(record), axis.at(record)))
                if bar:
                    if record["stage"] not in bars:
                        for earlier in bars.values():
                            earlier.close()
                        bars[record["stage"]] = ProgressBar(record["stage"])
                    bars[record["stage"]].show(record)
            for stage, stage_points in points.items():
                self.forward(stage, stage_points)

        try:
            with polling(forward_new, FOLLOW_EVERY_S, f"trackers {', '.join(stages)}", lambda exc: None):
                yield
        finally:
            for progress in bars.values():
                progress.close()

    def replay(self, run: str, lines: list[str], tokens_before: float, params: dict, final: dict[str, float]) -> None:
        """A finished run's metrics lines (a tuning trial's), its params, and `final` values at its end."""
        self._each(lambda sink: sink.params(run, params))
        records = filter(None, map(_record, lines))
        points = [(scalars(r), int(tokens_before + sum(r["tokens"].values()))) for r in records]
        if final:
            points.append((final, points[-1][1] if points else int(tokens_before)))
        self.forward(run, points)

    def log_versions(self, matrix: dict, deltas: dict, lineages: dict[str, dict]) -> None:
        """Each version's eval losses (and uptake and forgetting against its parent) at the cumulative
        tokens it was trained to."""
        for version, row in matrix.items():
            lineage = lineages.get(version) or {}
            summary = {
                "lineage": {key: lineage.get(key) for key in ("parent", "stage_hash", "finished", "tokens_per_corpus")}
            }
            self._each(lambda sink, version=version, summary=summary: sink.params(version, summary))
            values = {f"eval/{corpus}": r["loss"] for corpus, r in row.items() if r}
            delta = deltas.get(version) or {}
            values.update({f"uptake/{c}": v for c, v in delta.get("uptake", {}).items()})
            values.update({f"forgetting/{c}": v for c, v in delta.get("forgetting", {}).items()})
            if values:
                self.forward(version, [(values, int(tokens_through(version, lineages)))])

    def close(self, report_dir: str | None = None) -> None:
        self._each(lambda sink: sink.close(report_dir))


@contextmanager
def polling(poll: Callable[[], None], every_s: float, name: str, warn: Callable[[Exception], None]):
    """Call `poll` every `every_s` seconds from a thread while the block runs, then once more after it,
    in the caller's thread. A poll that fails in the thread goes to `warn` and the next one tries again.
    The last poll's error is raised, unless the block raised: its error is the one that counts."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                poll()
            except Exception as exc:  # noqa: BLE001 -- a storage blip: the next poll tries again
                warn(exc)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        stop.set()
        thread.join()
        try:
            poll()
        except Exception as exc:  # noqa: BLE001 -- the block's error is raised instead
            warn(exc)
        raise
    stop.set()
    thread.join()
    poll()


def bar(**options):
    """A tqdm bar for a terminal. shutil, not tqdm, measures it: one that reports no size (0 x 0) gets
    the fallback, where tqdm would hide the bar (no rows to show it in)."""
    size = shutil.get_terminal_size((100, 20))
    return tqdm(ncols=size.columns, nrows=size.lines, leave=True, **options)


def counted(items, total: int, desc: str, show: bool):
    """`items` as they come, counted on a bar when `show` (a terminal); else `items` as they are."""
    return bar(iterable=items, total=total, desc=desc) if show else items


class ProgressBar:
    """A stage's live progress in a terminal: steps, loss per corpus, tokens/s and ETA."""

    def __init__(self, stage: str):
        self.bar = bar(desc=f"[{stage}]", unit="step")

    def show(self, record: dict) -> None:
        self.bar.total = record["total_steps"]
        self.bar.n = record["step"]
        corpora = " ".join(f"{name} {loss:.3f}" for name, loss in record["loss_per_corpus"].items())
        self.bar.set_postfix_str(f"loss {record['loss']:.3f} ({corpora}) {record['tokens_per_s']:,.0f} tok/s")

    def close(self) -> None:
        self.bar.close()


class TokenAxis:
    """The pipeline's cumulative tokens at a metrics line of one of consecutive stages: the tokens before
    the first stage, those each earlier stage trained (as its latest line says), and the line's own."""

    def __init__(self, stages: list[str], tokens_before: float):
        self.stages, self.tokens_before, self.trained = stages, tokens_before, {}

    def at(self, record: dict) -> int:
        stage = record["stage"]
        self.trained[stage] = sum(record["tokens"].values())
        earlier = self.stages[: self.stages.index(stage)]
        return int(self.tokens_before + sum(self.trained.get(s, 0) for s in earlier) + self.trained[stage])


def _record(line: str) -> dict | None:
    """A metrics line, or None for one still being written (its reader came between two writes)."""
    try:
        return json.loads(line)
    except ValueError:
        return None


def tokens_through(version: str | None, lineages: dict[str, dict]) -> float:
    """Tokens trained from the start of the pipeline through `version` (along its parents)."""
    total = 0.0
    while version is not None and version in lineages:
        total += sum((lineages[version].get("tokens_per_corpus") or {}).values())
        version = lineages[version].get("parent")
    return total
