"""`mixloop status`: where a pipeline stands, from its workdir alone (local or object storage): the
versions done, what runs now (who holds the lock, the stage's last logged step), and what is left."""

from __future__ import annotations

import datetime
import time

from mixloop.config import Spec
from mixloop.evaluation.scores import read_score_matrix, score_summary
from mixloop.storage.layout import Workdir
from mixloop.storage.lock import describe, live_holder
from mixloop.train.metrics import MetricsRecord, last_metrics
from mixloop.versioning.gate import gate_summary
from mixloop.versioning.registry import current_version, list_versions


def status_lines(spec: Spec) -> list[str]:
    workdir = spec.workdir
    done = list_versions(workdir)
    left = [stage for stage in spec.resolved_stages() if stage.name not in done]
    last = last_metrics(Workdir(workdir).metrics, left[0].name) if left else None
    holder = live_holder(workdir)
    lines = [
        f"pipeline {spec.config.name} (workdir {workdir})",
        "done:    " + (", ".join(f"{name} ({_ago(v.finished)})" for name, v in done.items()) or "nothing yet"),
    ]
    if holder is not None:
        lines.append(f"running: {describe(holder)}")
        if last is not None:
            lines.append("         " + _progress(last))
    elif last is not None:
        lines.append(f"stopped: {_progress(last)}; `mixloop run` continues it from its last checkpoint")
    else:
        lines.append("running: nothing")
    lines.append(
        "left:    "
        + (
            ", ".join(
                f"{stage.name} ({stage.total_steps} steps of {stage.global_batch_tokens:,} tokens)" for stage in left
            )
            or "nothing"
        )
    )
    current = current_version(workdir)
    known = score_summary(read_score_matrix(workdir).get(current or "", {}))
    known = f"; knows {known}" if known else ""
    lines.append(
        "current: "
        + (
            f"{current} ({gate_summary(done[current])}{known})"
            if current is not None and current in done
            else "none yet"
        )
    )
    return lines


def _progress(record: MetricsRecord) -> str:
    return (
        f"stage {record.stage} at step {record.step}/{record.total_steps}, loss {record.loss:.3f}, "
        f"{record.tokens_per_s:,.0f} tok/s, logged {time.time() - record.time:.0f} s ago, ETA {record.eta}"
    )


def _ago(finished: str) -> str:
    seconds = (datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(finished)).total_seconds()
    return f"{seconds / 3600:.1f} h ago" if seconds >= 3600 else f"{seconds / 60:.0f} min ago"
