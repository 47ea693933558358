"""Experiment trackers as sinks: metrics.jsonl stays the source of truth, and the driver forwards what
it gains (the workers' reports, while a stage trains; each version's evaluation, at the report) to the
trackers the spec names. TensorBoard is on by default: one run per stage under <workdir>/tensorboard/,
with the pipeline's cumulative trained tokens as the step, so every stage lines up in one chart.

A tracker that fails (a full disk, a server that is down) never stops training: the failure is logged
once, and the tracker is tried again at the next forward.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from mixloop.storage import LOCAL_CACHE, is_local, join, read_lines, upload

Log = Callable[[str], None]
FOLLOW_EVERY_S = 2.0


def scalars(record: dict) -> dict[str, float]:
    """The training scalars of one metrics.jsonl record, by tracker name."""
    values = {"train/loss": record["loss"], "train/lr": record["lr"], "train/tokens_per_s": record["tokens_per_s"],
              "train/grad_norm": record["grad_norm"],
              "train/data_wait_share": record.get("data_s", 0.0) / max(record.get("step_seconds", 0.0), 1e-9)}
    values.update({f"train/loss/{corpus}": loss for corpus, loss in record["loss_per_corpus"].items()})
    return {name: float(value) for name, value in values.items() if value == value}  # NaN: a skipped step


class TensorBoard:
    """Event files under <workdir>/tensorboard/<stage>/ (for a workdir on object storage: written here
    and uploaded after each forward)."""

    def __init__(self, workdir: str):
        self.target = join(workdir, "tensorboard")
        self.root = Path(self.target.removeprefix("file://")) if is_local(workdir) else LOCAL_CACHE / "tensorboard"
        self.writers: dict = {}

    def log(self, run: str, values: dict[str, float], step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if run not in self.writers:
            self.writers[run] = SummaryWriter(log_dir=str(self.root / run), flush_secs=5)
        for name, value in values.items():
            self.writers[run].add_scalar(name, value, global_step=step)

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()
        if not is_local(self.target) and self.root.exists():
            upload(str(self.root), self.target)


class Trackers:
    """The trackers of a pipeline. `follow` forwards a training stage's new metrics lines while it trains;
    `log_versions` forwards each version's eval losses, uptake and forgetting."""

    def __init__(self, workdir: str, tensorboard: bool = True, log: Log = print):
        self.workdir, self.log = workdir, log
        self.sinks = [TensorBoard(workdir)] if tensorboard else []
        self.failing: set[str] = set()

    def forward(self, run: str, values: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            name = type(sink).__name__
            try:
                sink.log(run, values, step)
                sink.flush()
                self.failing.discard(name)
            except Exception as exc:  # noqa: BLE001 -- a tracker must never stop training
                self._warn(name, exc)

    def _warn(self, name: str, exc: Exception) -> None:
        if name not in self.failing:
            self.failing.add(name)
            self.log(f"warning: tracker {name} failed ({type(exc).__name__}: {exc}); training goes on, "
                     "and it is tried again at the next report")

    @contextmanager
    def follow(self, stage: str, tokens_before: float):
        """Forward the stage's metrics lines as they are appended, until the block ends (then once more)."""
        if not self.sinks:
            yield
            return
        stop, forwarded = threading.Event(), [0]

        def forward_new() -> None:
            try:
                lines = read_lines(join(self.workdir, "metrics.jsonl"))
            except Exception as exc:  # noqa: BLE001 -- a storage blip: the next poll reads again
                self._warn("metrics.jsonl", exc)
                return
            mine = [r for r in map(_record, lines) if r is not None and r.get("stage") == stage]
            for record in mine[forwarded[0]:]:
                self.forward(stage, scalars(record), int(tokens_before + sum(record["tokens"].values())))
            forwarded[0] = len(mine)

        def loop() -> None:
            while not stop.wait(FOLLOW_EVERY_S):
                forward_new()

        thread = threading.Thread(target=loop, name=f"trackers {stage}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            forward_new()

    def log_versions(self, matrix: dict, deltas: dict, lineages: dict[str, dict]) -> None:
        """Each version's eval losses (and uptake and forgetting against its parent) at the cumulative
        tokens it was trained to."""
        for version, row in matrix.items():
            values = {f"eval/{corpus}": r["loss"] for corpus, r in row.items() if r}
            delta = deltas.get(version) or {}
            values.update({f"uptake/{c}": v for c, v in delta.get("uptake", {}).items()})
            values.update({f"forgetting/{c}": v for c, v in delta.get("forgetting", {}).items()})
            if values:
                self.forward(version, values, int(tokens_through(version, lineages)))


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
