"""The report's knowledge plots: each version's benchmark scores with their error bars, and what each
version gained or lost in them against its parent (bars of ± 2 standard errors of the difference)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from mixloop.evaluation.scores import ScoreMatrix  # noqa: E402

GAIN, LOSS, NOISE = "tab:green", "tab:red", "tab:gray"


def plot_scores(scores: ScoreMatrix, path: Path) -> None:
    """Grouped bars: one group per task, one bar per version, its standard error as an error bar."""
    versions, tasks = list(scores), sorted({t for row in scores.values() for t in row})
    width = 0.8 / max(len(versions), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tasks) * max(len(versions), 2) / 3 + 2), 4))
    for index, version in enumerate(versions):
        cells = [scores[version].get(t) for t in tasks]
        xs = [i + (index - (len(versions) - 1) / 2) * width for i in range(len(tasks))]
        values = [c.value if c else float("nan") for c in cells]
        errors = [(c.stderr or 0.0) if c else 0.0 for c in cells]
        ax.bar(xs, values, width, yerr=errors, capsize=2, label=version)
    ax.set_xticks(range(len(tasks)), [_label(scores, t) for t in tasks], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (error bars: ± 1 standard error)")
    ax.legend(fontsize=7, ncols=min(len(versions), 4))
    _save(fig, path)


def plot_score_changes(score_deltas: dict[str, dict[str, dict]], path: Path) -> None:
    """One bar per (version, task): its change against its parent, ± 2 standard errors of the difference;
    green or red only where the change is beyond that noise."""
    bars = [(f"{v}\n{t}", d) for v, row in score_deltas.items() for t, d in sorted(row.items())]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars) + 2), 4))
    colours = [(GAIN if d["change"] > 0 else LOSS) if d["significant"] else NOISE for _, d in bars]
    errors = [2 * (d["stderr"] or 0.0) for _, d in bars]
    ax.bar(range(len(bars)), [d["change"] for _, d in bars], yerr=errors, capsize=3, color=colours)
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("score change vs parent\n(grey: within ± 2 standard errors)")
    _save(fig, path)


def _label(scores: ScoreMatrix, task: str) -> str:
    metric = next(row[task].metric for row in scores.values() if task in row)
    return f"{task}\n({metric})"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")  # labels stay inside
    plt.close(fig)
