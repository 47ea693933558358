"""The iteration report: one HTML page with PNG plots of what each version gained and forgot.

<workdir>/report/index.html shows training loss per corpus and the learning rate against
cumulative tokens with stage boundaries, the eval matrix as a heatmap, uptake and forgetting
per version, the lineage as a graph, chat health, every version's answers to the same prompts side
by side, and the workdir's tuning searches (verdict, trials, objective plot).
"""

from __future__ import annotations

import html
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from mixloop.config import Share  # noqa: E402
from mixloop.evaluation.evaluate import SIGNS, delta_bars, format_pairs  # noqa: E402
from mixloop.evaluation.score_plots import plot_score_changes, plot_scores  # noqa: E402
from mixloop.evaluation.scores import ScoreMatrix  # noqa: E402
from mixloop.storage.fs import is_local, join, read_json, upload  # noqa: E402
from mixloop.storage.layout import Workdir  # noqa: E402
from mixloop.train.metrics import MetricsRecord, read_metrics  # noqa: E402
from mixloop.versioning.gate import gate_summary  # noqa: E402
from mixloop.versioning.lineage import Lineages, mixture_shares  # noqa: E402
from mixloop.versioning.registry import current_version  # noqa: E402

BETTER, WORSE = "tab:green", "tab:red"


@dataclass(frozen=True)
class TrainingCurve:
    """A stage's logged points in step order, at the tokens trained since the start of the pipeline."""

    stage: str
    start: float
    """Tokens trained before the stage began."""
    points: list[MetricsRecord]

    def tokens_at(self, point: MetricsRecord) -> float:
        return self.start + sum(point.tokens.values())


def training_curves(metrics_path: str, stage_order: list[str]) -> list[TrainingCurve]:
    """Per stage, its logged points in step order (the last line of a repeated step wins)."""
    by_stage: dict[str, dict[int, MetricsRecord]] = {}
    for record in read_metrics(metrics_path):
        by_stage.setdefault(record.stage, {})[record.step] = record
    curves, offset = [], 0.0
    for stage in stage_order:
        points = [by_stage[stage][step] for step in sorted(by_stage.get(stage, {}))]
        if points:
            curves.append(TrainingCurve(stage, offset, points))
            offset = curves[-1].tokens_at(points[-1])
    return curves


def _plot_training(curves: list[TrainingCurve], path: Path) -> None:
    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=[3, 1])
    corpora = sorted({c for curve in curves for p in curve.points for c in p.loss_per_corpus})
    colours = dict(zip(corpora, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for corpus in corpora:  # one line per stage, so a corpus that skips a stage is not bridged
        for index, curve in enumerate(c for c in curves if any(corpus in p.loss_per_corpus for p in c.points)):
            xs, ys = zip(
                *[(curve.tokens_at(p), p.loss_per_corpus[corpus]) for p in curve.points if corpus in p.loss_per_corpus]
            )
            loss_ax.plot(xs, ys, marker=".", color=colours[corpus], label=corpus if index == 0 else None)
    lr_ax.plot(
        [c.tokens_at(p) for c in curves for p in c.points], [p.lr for c in curves for p in c.points], color="black"
    )
    for curve in curves:
        for ax in (loss_ax, lr_ax):
            ax.axvline(curve.start, color="grey", linestyle=":")
        loss_ax.annotate(
            curve.stage, (curve.start, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8, rotation=90
        )
    loss_ax.set_ylabel("training loss")
    loss_ax.legend(fontsize=8)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("tokens trained since the start of the pipeline")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")  # labels and arcs stay inside
    plt.close(fig)


def _plot_matrix(matrix: dict, path: Path) -> None:
    versions = list(matrix)
    sets = sorted({c for row in matrix.values() for c in row})
    values = [[(matrix[v].get(s) or {}).get("loss", float("nan")) for s in sets] for v in versions]
    fig, ax = plt.subplots(figsize=(1.6 * len(sets) + 2, 0.5 * len(versions) + 1.5))
    image = ax.imshow(values, cmap="viridis_r", aspect="auto")
    middle = sum(image.get_clim()) / 2
    ax.set_xticks(range(len(sets)), sets, rotation=30, ha="right")
    ax.set_yticks(range(len(versions)), versions)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="white" if value > middle else "black"
            )
    fig.colorbar(image, ax=ax, label="eval loss")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")  # labels and arcs stay inside
    plt.close(fig)


def _plot_deltas(deltas: dict, path: Path) -> None:
    bars = delta_bars(deltas)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars) + 2), 4))
    ax.bar(
        range(len(bars)), [value for _, value, _ in bars], color=[BETTER if better else WORSE for _, _, better in bars]
    )
    ax.set_xticks(range(len(bars)), [label for label, _, _ in bars], fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("fall of eval loss vs parent\n(green: better, red: worse)")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")  # labels and arcs stay inside
    plt.close(fig)


def _plot_lineage(lineages: Lineages, path: Path) -> None:
    """Versions left to right, an arrow from each parent; a branch from an earlier version is an arc
    over the versions between, drawn in data coordinates so the axes (and the image) hold it."""
    order = list(lineages)
    fig, ax = plt.subplots(figsize=(2.2 * len(order) + 1, 2.5))
    top = 0.5
    for x, version in enumerate(order):
        ax.text(x, 0, version, ha="center", va="center", bbox={"boxstyle": "round", "facecolor": "lightyellow"})
        parent = lineages[version].parent
        if parent not in order:
            continue
        px = order.index(parent)
        height = 0.35 * (x - px - 1)  # 0 for the previous version: a straight arrow
        t = np.linspace(0, 1, 40)
        xs, ys = px + 0.3 + (x - px - 0.6) * t, 4 * height * t * (1 - t) + 0.12 * (height > 0)
        ax.plot(xs[:-1], ys[:-1], color="black", linewidth=1)
        ax.annotate("", (xs[-1], ys[-1]), (xs[-2], ys[-2]), arrowprops={"arrowstyle": "->", "color": "black"})
        top = max(top, height + 0.5)
    ax.set_xlim(-0.8, len(order) - 0.2)
    ax.set_ylim(-0.6, top)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")  # labels stay inside
    plt.close(fig)


def write_report(
    workdir: str,
    lineages: Lineages,
    matrix: dict,
    deltas: dict,
    health: dict,
    unmeasured: Sequence[str] = (),
    scores: ScoreMatrix | None = None,
    score_deltas: dict | None = None,
) -> str:
    """Write <workdir>/report/index.html and its plots; returns the page's path or URI. `unmeasured`:
    the corpora without an eval split, which the page names with how to add one; `scores`: the versions'
    benchmark scores and `score_deltas` their changes against their parents (evaluation.scores)."""
    target = Workdir(workdir).report
    knowledge = (scores or {}, score_deltas or {})
    if is_local(target):
        folder = Path(target.removeprefix("file://"))
        return str(_write_pages(folder, workdir, lineages, matrix, deltas, health, unmeasured, knowledge))
    with tempfile.TemporaryDirectory() as staging:
        _write_pages(Path(staging), workdir, lineages, matrix, deltas, health, unmeasured, knowledge)
        upload(staging, target, last="index.html")
    return join(target, "index.html")


def _write_pages(
    folder: Path,
    workdir: str,
    lineages: Lineages,
    matrix: dict,
    deltas: dict,
    health: dict,
    unmeasured: Sequence[str],
    knowledge: tuple[ScoreMatrix, dict],
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stages = [v for v, lineage in lineages.items() if lineage.stage is not None]
    curves = training_curves(Workdir(workdir).metrics, stages)
    images = {"training.png": "Training loss per corpus and learning rate"}
    if curves:
        _plot_training(curves, folder / "training.png")
    else:
        images.pop("training.png")
    if any(matrix.values()):  # no eval split at all: nothing to draw
        _plot_matrix(matrix, folder / "eval_matrix.png")
        images["eval_matrix.png"] = "Eval loss: versions by eval sets"
    if deltas:
        _plot_deltas(deltas, folder / "uptake_forgetting.png")
        images["uptake_forgetting.png"] = "Uptake and forgetting against the parent version"
    _plot_lineage(lineages, folder / "lineage.png")
    images["lineage.png"] = "Lineage"
    page = folder / "index.html"
    sections = _knowledge_sections(folder, *knowledge) + _searches(workdir, folder)
    page.write_text(_html(lineages, matrix, deltas, health, images, unmeasured, sections, current_version(workdir)))
    return page


def _knowledge_sections(folder: Path, scores: ScoreMatrix, score_deltas: dict) -> list[str]:
    """What each version knows: its benchmark scores (± standard error) and their changes against its
    parent, as tables and plots with error bars."""
    if not scores:
        return []
    plot_scores(scores, folder / "scores.png")
    tasks = sorted({t for row in scores.values() for t in row})
    table = _table(
        ["version", *tasks], [[v, *(row[t].text() if t in row else "-" for t in tasks)] for v, row in scores.items()]
    )
    sections = [
        "<h2>What each version knows: benchmark scores (± standard error)</h2>"
        + table
        + "<img src='scores.png' alt='benchmark scores per version'>"
    ]
    if score_deltas:
        plot_score_changes(score_deltas, folder / "score_changes.png")
        rows = [
            [
                v,
                t,
                f"{d['change']:+.3f}",
                "-" if d["stderr"] is None else f"{d['stderr']:.3f}",
                "yes" if d["significant"] else "no (noise)",
            ]
            for v, row in score_deltas.items()
            for t, d in sorted(row.items())
        ]
        sections.append(
            "<h2>Knowledge gained and lost against the parent</h2>"
            + _table(["version", "task", "change", "stderr of the change", "beyond 2 stderr"], rows)
            + "<img src='score_changes.png' alt='score changes against the parent'>"
        )
    return sections


def _searches(workdir: str, folder: Path) -> list[str]:
    """The workdir's tuning searches, one part each: its verdict, its trials and its objective plot."""
    fs, root = fsspec.core.url_to_fs(Workdir(workdir).tune)
    if not fs.isdir(root):
        return []
    sections = []
    for name in sorted(path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(root, detail=False)):
        search = Workdir(workdir).search(name)
        results = read_json(search.results)
        if results is None:
            continue
        keys = [k for k in (results["trials"][0] if results["trials"] else {}) if k.startswith("objective")]
        rows = [
            [
                t["trial"],
                t["arm"],
                t["status"],
                *(_number(t.get(k)) for k in keys),
                mixture_shares({c: Share.model_validate(w) for c, w in t["mixture"].items()}),
                t["lr_peak"],
                f"{t['tokens']:,}",
            ]
            for t in results["trials"]
        ]
        section = f"<h3>{html.escape(name)}</h3><p>{html.escape(results['verdict'])}</p>" + _table(
            ["trial", "arm", "status", *keys, "mixture", "peak LR", "tokens"], rows
        )
        plot = fsspec.core.url_to_fs(search.objective_plot)[1]
        if fs.exists(plot):
            fs.get_file(plot, str(folder / f"tune-{name}.png"))
            section += f"<img src='tune-{name}.png' alt='objective of the trials of {html.escape(name)}'>"
        sections.append(section)
    return ["<h2>Tuning searches</h2>" + "".join(sections)] if sections else []


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(lineages, matrix, deltas, health, images, unmeasured, sections_after, current) -> str:
    sections = (
        [
            f"<p class='note'>No eval split for {html.escape(', '.join(unmeasured))}: uptake and forgetting "
            "are not measured on them. Add <code>eval: &lt;held-out file&gt;</code> to each of these corpora "
            "in the spec and run <code>mixloop report</code> again.</p>"
        ]
        if unmeasured
        else []
    )
    sections += [
        f"<h2>{html.escape(title)}</h2><img src='{name}' alt='{html.escape(title)}'>" for name, title in images.items()
    ]
    sections += _loss_sections(matrix, deltas)
    if health:
        sections += _health_sections(health)
    sections += sections_after
    sections.append(_versions_section(lineages, current))
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1100px}img{max-width:100%}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "font-size:13px;text-align:left;vertical-align:top}.note{background:#fff4d6;padding:8px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>mixloop report</title>"
        f"<style>{style}</style></head><body><h1>mixloop report</h1>{''.join(sections)}</body></html>\n"
    )


def _loss_sections(matrix: dict, deltas: dict) -> list[str]:
    """The eval loss of every version on every split, and what each gained and forgot."""
    sets = sorted({c for row in matrix.values() for c in row})
    losses = "<h2>Eval loss</h2>" + _table(
        ["version"] + sets,
        [[v] + [f"{(row.get(s) or {}).get('loss', float('nan')):.4f}" for s in sets] for v, row in matrix.items()],
    )
    changes = f"<h2>What each version gained and forgot</h2><p>{html.escape(SIGNS)}.</p>" + _table(
        ["version", "parent", "uptake (new corpora)", "forgetting (earlier corpora)", "forgetting vs best ancestor"],
        [
            [
                v,
                d["parent"],
                format_pairs(d["uptake"]),
                format_pairs(d["forgetting"]),
                format_pairs(d["forgetting_vs_best"]),
            ]
            for v, d in deltas.items()
        ],
    )
    return [losses, changes]


def _health_sections(health: dict) -> list[str]:
    """Chat health per version and chat set, and the versions' answers to the same prompts."""
    scores = "<h2>Chat health (greedy answers to eval prompts)</h2>" + _table(
        ["version", "chat set", "ended the turn", "repeated 4-grams", "mean length"],
        [
            [v, c, f"{h['ended']:.0%}", f"{h['repetition']:.1%}", f"{h['length']:.1f}"]
            for v, corpora in health.items()
            for c, h in corpora.items()
        ],
    )
    return [scores, "<h2>Sample answers, version by version</h2>" + _answers_side_by_side(health)]


def _versions_section(lineages: Lineages, current: str | None) -> str:
    return "<h2>Versions</h2>" + _table(
        ["version", "parent", "mixture", "tokens", "finished", "gate"],
        [
            [
                v + (" (current)" if v == current else ""),
                lin.parent or "-",
                mixture_shares(lin.stage.mixture) if lin.stage else "-",
                f"{lin.trained_tokens:,.0f}",
                lin.finished,
                gate_summary(lin),
            ]
            for v, lin in lineages.items()
        ],
    )


def _answers_side_by_side(health: dict) -> str:
    """One row per eval prompt, one column per version: how each answered the same prompt."""
    versions = list(health)
    rows = []
    for corpus in sorted({c for corpora in health.values() for c in corpora}):
        examples = {v: (health[v].get(corpus) or {}).get("examples", []) for v in versions}
        prompts = max(examples.values(), key=len)
        for index, example in enumerate(prompts):
            rows.append(
                [corpus, example["prompt"]]
                + [examples[v][index]["answer"] if index < len(examples[v]) else "-" for v in versions]
            )
    return _table(["chat set", "prompt", *versions], rows)
