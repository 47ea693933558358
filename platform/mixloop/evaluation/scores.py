"""The knowledge matrix: every version's scores on the spec's benchmarks (lm-eval tasks and probes),
beside the loss matrix, and what each version gained or lost in them against its parent.

A task's headline is one metric: accuracy for multiple choice (acc), exact match for questions
answered in chat, else the first metric lm-eval reports for it. Every score keeps its standard error,
and a change is judged against the standard error of the difference (sqrt(se_a² + se_b²)), so a
change within the noise of a few dozen questions is not called a gain or a loss.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from mixloop.runs.tracking import counted
from mixloop.storage.fs import exists, join, read_text
from mixloop.storage.layout import Workdir
from mixloop.versioning.lineage import Lineages
from mixloop.versioning.registry import version_dir

if TYPE_CHECKING:  # the scoring engine reads probes with pyarrow: not for the commands that only show scores
    from mixloop.evaluation.knowledge import Benchmarks, VersionScores

# The metric that stands for a task, in order of preference (lm-eval's names).
HEADLINE_METRICS = ("acc", "exact_match", "acc_norm", "contains", "f1", "mcc", "bleu")


@dataclass(frozen=True)
class Score:
    """A task's headline metric on one version."""

    metric: str
    value: float
    stderr: float | None
    samples: int

    def text(self) -> str:
        return f"{self.value:.3f}" + (f"±{self.stderr:.3f}" if self.stderr is not None else "")


ScoreMatrix = dict[str, dict[str, Score]]  # version -> task -> headline score


def score_versions(
    workdir: str, versions: list[str], benchmarks: Benchmarks, progress_bar: bool = False
) -> dict[str, VersionScores]:
    """Every version's scores: from the cache where the same weights were scored on the same benchmarks,
    else measured in one Ray task (lm-eval's imports and the harness paid once for all versions)."""
    # lazy: ray; the scoring engine (pyarrow through its probe reader)
    import ray

    from mixloop.evaluation.knowledge import score_key, score_version

    cache = Workdir(workdir).knowledge_cache
    folders = {v: version_dir(workdir, v) for v in versions}
    missing = [v for v in versions if not exists(join(cache, f"{score_key(folders[v], benchmarks)}.json"))]
    if missing:
        remote = ray.remote(num_cpus=1)(_score_all)
        ray.get(remote.remote([folders[v] for v in missing], benchmarks, cache))
    scored = (score_version(folders[v], benchmarks, cache) for v in versions)  # all cached now
    return dict(zip(versions, counted(scored, len(versions), "[knowledge] versions", progress_bar)))


def _score_all(folders: list[str], benchmarks: Benchmarks, cache: str) -> None:
    # lazy: torch, only inside the scoring task; the scoring engine
    import torch

    from mixloop.evaluation.knowledge import score_version

    torch.set_num_threads(1)  # as the loss matrix's tasks: one core each
    # lm-eval draws progress bars on stderr (per request type and task, some it cannot be told to keep
    # off): noise among the pipeline's lines for work of a second. An error still raises as it is.
    with contextlib.redirect_stderr(io.StringIO()):
        for folder in folders:
            score_version(folder, benchmarks, cache)


def headlines(scores: dict[str, VersionScores]) -> ScoreMatrix:
    """Each version's headline score per task, group and probe."""
    matrix: ScoreMatrix = {}
    for version, result in scores.items():
        by_task: dict[str, dict[str, Score]] = {}
        for s in result.scores:
            if s.filter in ("none", "strict-match"):
                by_task.setdefault(s.task, {})[s.metric] = Score(s.metric, s.value, s.stderr, s.samples)
        matrix[version] = {task: _headline(metrics) for task, metrics in sorted(by_task.items())}
    return matrix


def _headline(metrics: dict[str, Score]) -> Score:
    return next((metrics[m] for m in HEADLINE_METRICS if m in metrics), next(iter(metrics.values())))


def score_deltas(matrix: ScoreMatrix, lineages: Lineages) -> dict[str, dict[str, dict]]:
    """Per version, per task both it and its parent were scored on: {"parent", "change", "stderr"}
    (the standard error of the difference), and "significant" when the change is beyond 2 of them."""
    deltas: dict[str, dict[str, dict]] = {}
    for version, lineage in lineages.items():
        parent = lineage.parent
        if parent is None or version not in matrix or parent not in matrix:
            continue
        deltas[version] = {
            task: change(matrix[parent][task], score)
            for task, score in matrix[version].items()
            if task in matrix[parent]
        }
    return deltas


def change(before: Score, after: Score) -> dict:
    """after - before, with the standard error of the difference (None when either has none)."""
    stderr = math.hypot(before.stderr, after.stderr) if before.stderr is not None and after.stderr is not None else None
    difference = after.value - before.value
    return {"change": difference, "stderr": stderr, "significant": stderr is not None and abs(difference) > 2 * stderr}


def format_scores(matrix: ScoreMatrix) -> str:
    """A plain-text table: versions down, tasks across, each cell `value±stderr` of its headline metric."""
    tasks = sorted({t for row in matrix.values() for t in row})
    metrics = {t: next(row[t].metric for row in matrix.values() if t in row) for t in tasks}
    width = max([len(v) for v in matrix] + [7])
    cell = max([len(f"{t} ({metrics[t]})") for t in tasks] + [13])
    lines = [f"{'version':<{width}}  " + "  ".join(f"{f'{t} ({metrics[t]})':>{cell}}" for t in tasks)]
    for version, row in matrix.items():
        lines.append(
            f"{version:<{width}}  " + "  ".join(f"{row[t].text() if t in row else '-':>{cell}}" for t in tasks)
        )
    return "\n".join(lines)


def score_summary(row: dict[str, Score]) -> str:
    """A version's headline scores in a few words: `astronomy 0.250±0.090, general 0.900±0.050`."""
    return ", ".join(f"{task} {score.text()}" for task, score in sorted(row.items()))


def as_json(matrix: ScoreMatrix) -> dict:
    return {v: {t: asdict(s) for t, s in row.items()} for v, row in matrix.items()}


def read_score_matrix(workdir: str) -> ScoreMatrix:
    """eval/scores.json as the last report wrote it ({} before any)."""
    path = Workdir(workdir).eval_scores
    if not exists(path):
        return {}
    return {v: {t: Score(**s) for t, s in row.items()} for v, row in json.loads(read_text(path)).items()}
