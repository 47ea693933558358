"""Metrics lines: what rank 0 of a stage appends to `metrics.jsonl` at every report (a tuning trial, to
its own folder's), one JSON object a line. This module is the only one that writes or parses them;
what is derived from a line (its ETA, a stage's last line) is the record's own."""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict

from mixloop.storage.fs import LogFollower, append_line, read_lines


class MetricsRecord(BaseModel):
    """The steps since the previous report of one stage, all-reduced over its workers."""

    # A skipped step's loss and grad norm are NaN: written as NaN (as json.dumps does), not as null.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    stage: str
    step: int
    total_steps: int
    lr: float
    loss: float
    """Token-mean loss over the window's supervised tokens, all corpora together."""
    loss_per_corpus: dict[str, float]
    grad_norm: float
    skipped_steps: int
    tokens_per_s: float
    step_seconds: float
    tokens: dict[str, float]
    """Tokens trained per corpus since the stage began (the documents' own, padding excluded)."""
    time: float
    peak_memory_mb: float
    row_hashes: dict[int, str]
    """A hash of the rows each step read, for checking that a resumed stage reads the same rows."""
    workers: int
    data_s: float = 0.0
    compute_s: float = 0.0
    sync_s: float = 0.0
    report_s: float = 0.0
    """Mean seconds per step in each phase (measured where the phase ran in this window)."""

    @property
    def eta_seconds(self) -> int:
        """Seconds left for the stage at this window's pace."""
        return int(self.step_seconds * (self.total_steps - self.step))

    @property
    def eta(self) -> str:
        return format_eta(self.eta_seconds)

    @property
    def data_wait_share(self) -> float:
        return self.data_s / max(self.step_seconds, 1e-9)


def format_eta(seconds: float) -> str:
    """Seconds left as minutes:seconds, the way every progress line shows an ETA."""
    whole = int(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


def append_metrics(path: str, record: MetricsRecord) -> None:
    append_line(path, _line(record))


def _line(record: MetricsRecord) -> str:
    # json.dumps's spacing ({"stage": "s1", ...}), as the log has always been written: people grep it.
    return json.dumps(record.model_dump(mode="json"))


def parse_metrics(lines: list[str]) -> list[MetricsRecord]:
    return [MetricsRecord.model_validate_json(line) for line in lines if line.strip()]


def _parsed(line: str) -> MetricsRecord | None:
    """A line, or None for one cut short (a reader polling an object store can list an append whose
    object is still being written)."""
    try:
        return MetricsRecord.model_validate_json(line)
    except ValueError:
        return None


def read_metrics(path: str, stage: str | None = None) -> list[MetricsRecord]:
    """The lines of a metrics log (of one stage, if named), in the order they were written."""
    records = parse_metrics(read_lines(path))
    return [r for r in records if stage is None or r.stage == stage]


def last_metrics(path: str, stage: str) -> MetricsRecord | None:
    """A stage's last line, or None when it has not reported yet."""
    records = read_metrics(path, stage)
    return records[-1] if records else None


class MetricsFollower:
    """The lines appended to a metrics log since the last call, for a reader that polls it while the
    workers append (the trackers)."""

    def __init__(self, path: str):
        self.log = LogFollower(path)

    def new_records(self) -> list[MetricsRecord]:
        return [r for r in map(_parsed, self.log.new_lines()) if r is not None]


def as_lines(records: list[MetricsRecord]) -> str:
    """Records as the log holds them (to copy one log's lines into another)."""
    return "\n".join(_line(r) for r in records)
