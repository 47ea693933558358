"""Experiment trackers: metrics.jsonl stays the source of truth, and the driver forwards what it gains
(the workers' reports, while a stage trains; each version's evaluation, at the report) to the tracker
sinks the spec names (`tracking:`; the sinks are in runs.sinks).

Every tracker takes the pipeline's cumulative trained tokens as the step, so all stages line up in one
chart, and a stage's resolved settings as its params. A tracker that fails (a full disk, a server that
is down) never stops training: the failure is logged once, and it is tried again at the next forward.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from contextlib import contextmanager

from tqdm import tqdm

from mixloop.config import ResolvedStage
from mixloop.runs.sinks import MLflow, TensorBoard, TrackerSink, WandB
from mixloop.storage.layout import Workdir
from mixloop.train.metrics import MetricsFollower, MetricsRecord
from mixloop.versioning.lineage import Lineages

logger = logging.getLogger(__name__)
FOLLOW_EVERY_S = 2.0


def scalars(record: MetricsRecord) -> dict[str, float]:
    """The training scalars of one metrics line, by tracker name."""
    values = {
        "train/loss": record.loss,
        "train/lr": record.lr,
        "train/tokens_per_s": record.tokens_per_s,
        "train/grad_norm": record.grad_norm,
        "train/data_wait_share": record.data_wait_share,
    }
    values.update({f"train/loss/{corpus}": loss for corpus, loss in record.loss_per_corpus.items()})
    return {name: float(value) for name, value in values.items() if value == value}  # NaN: a skipped step


class Trackers:
    """The trackers of a pipeline. `follow` forwards a training stage's new metrics lines while it
    trains; `log_versions` forwards each version's eval losses, uptake and forgetting; `close` ends the
    runs (and gives MLflow the report)."""

    def __init__(self, workdir: str, sinks: list[TrackerSink] | None = None):
        self.workdir = workdir
        self.sinks = [TensorBoard(workdir)] if sinks is None else sinks
        self.failing: set[str] = set()

    @classmethod
    def of(cls, spec) -> Trackers:
        """The trackers a spec's `tracking:` names."""
        tracking, workdir, name = spec.config.tracking, spec.workdir, spec.config.name
        sinks: list[TrackerSink] = [TensorBoard(workdir)] if tracking.tensorboard else []
        if tracking.mlflow is not None:
            sinks.append(MLflow(tracking.mlflow.tracking_uri, tracking.mlflow.experiment or name, name))
        if tracking.wandb is not None:
            sinks.append(WandB(tracking.wandb.project, tracking.wandb.mode, tracking.wandb.entity, name, workdir))
        return cls(workdir, sinks)

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
            logger.warning(
                f"warning: tracker {name} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
                "training goes on, and it is tried again at the next report"
            )

    @contextmanager
    def follow(self, stages: list[ResolvedStage], tokens_before: float, bar: bool = False):
        """Forward the metrics lines of `stages` (in the order they train, each the next one's parent) as they are appended, until the block ends (then once more), on the pipeline's axis
        of cumulative tokens from `tokens_before`. `bar`: also show them as progress bars, a stage's from
        its first line (in a terminal, instead of the workers' lines)."""
        if not self.sinks and not bar:
            yield
            return
        for stage in stages:
            self._each(lambda sink, stage=stage: sink.params(stage.name, stage.as_json()))
        names = [stage.name for stage in stages]
        metrics = MetricsFollower(Workdir(self.workdir).metrics)
        axis, bars = TokenAxis(names, tokens_before), dict[str, ProgressBar]()

        def forward_new() -> None:
            try:
                records = metrics.new_records()
            except Exception as exc:  # noqa: BLE001 -- a storage blip: the next poll reads again
                self._warn("metrics.jsonl", exc)
                return
            points: dict[str, list] = {}
            for record in (r for r in records if r.stage in names):
                points.setdefault(record.stage, []).append((scalars(record), axis.at(record)))
                if bar:
                    if record.stage not in bars:
                        for earlier in bars.values():
                            earlier.close()
                        bars[record.stage] = ProgressBar(record.stage)
                    bars[record.stage].show(record)
            for stage, stage_points in points.items():
                self.forward(stage, stage_points)

        try:
            with polling(forward_new, FOLLOW_EVERY_S, f"trackers {', '.join(names)}", lambda exc: None):
                yield
        finally:
            for progress in bars.values():
                progress.close()

    def replay(
        self, run: str, records: list[MetricsRecord], tokens_before: float, params: dict, final: dict[str, float]
    ) -> None:
        """A finished run's metrics lines (a tuning trial's), its params, and `final` values at its end."""
        self._each(lambda sink: sink.params(run, params))
        points = [(scalars(r), int(tokens_before + sum(r.tokens.values()))) for r in records]
        if final:
            points.append((final, points[-1][1] if points else int(tokens_before)))
        self.forward(run, points)

    def log_versions(self, matrix: dict, deltas: dict, lineages: Lineages, scores: dict | None = None) -> None:
        """Each version's eval losses (and uptake and forgetting against its parent) and benchmark scores
        (with their standard errors) at the cumulative tokens it was trained to."""
        for version, row in matrix.items():
            lineage = lineages.get(version)
            kept = {"parent", "stage_hash", "finished", "tokens_per_corpus"}
            summary = {"lineage": lineage.model_dump(mode="json", include=kept) if lineage else {}}
            self._each(lambda sink, version=version, summary=summary: sink.params(version, summary))
            values = {f"eval/{corpus}": r["loss"] for corpus, r in row.items() if r}
            delta = deltas.get(version) or {}
            values.update({f"uptake/{c}": v for c, v in delta.get("uptake", {}).items()})
            values.update({f"forgetting/{c}": v for c, v in delta.get("forgetting", {}).items()})
            for task, score in (scores or {}).get(version, {}).items():  # knowledge/<task>/<metric>, its stderr
                values[f"knowledge/{task}/{score.metric}"] = score.value
                values.update(
                    {f"knowledge/{task}/{score.metric}_stderr": score.stderr} if score.stderr is not None else {}
                )
            if values:
                self.forward(version, [(values, int(lineages.tokens_through(version)))])

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

    def show(self, record: MetricsRecord) -> None:
        self.bar.total = record.total_steps
        self.bar.n = record.step
        corpora = " ".join(f"{name} {loss:.3f}" for name, loss in record.loss_per_corpus.items())
        self.bar.set_postfix_str(f"loss {record.loss:.3f} ({corpora}) {record.tokens_per_s:,.0f} tok/s")

    def close(self) -> None:
        self.bar.close()


class TokenAxis:
    """The pipeline's cumulative tokens at a metrics line of one of consecutive stages: the tokens before
    the first stage, those each earlier stage trained (as its latest line says), and the line's own."""

    def __init__(self, stages: list[str], tokens_before: float):
        self.stages, self.tokens_before = stages, tokens_before
        self.trained: dict[str, float] = {}  # stage -> tokens its latest line says it trained

    def at(self, record: MetricsRecord) -> int:
        stage = record.stage
        self.trained[stage] = sum(record.tokens.values())
        earlier = self.stages[: self.stages.index(stage)]
        return int(self.tokens_before + sum(self.trained.get(s, 0) for s in earlier) + self.trained[stage])
