"""A search's results: the trials table (CSV and JSON), a plot of the objective (or the Pareto front),
the verdict against the stratified baseline, and the best stage as YAML, which --apply appends to
the pipeline spec.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import yaml  # noqa: E402

from mixloop.config import load_spec  # noqa: E402
from mixloop.config.edit import append_entries, replace_validated  # noqa: E402
from mixloop.errors import MixloopError  # noqa: E402
from mixloop.storage.fs import upload, write_json, write_text  # noqa: E402
from mixloop.storage.layout import OBJECTIVE_PLOT, SearchFolder
from mixloop.tuning.objectives import objective_keys  # noqa: E402
from mixloop.tuning.search import Search  # noqa: E402

logger = logging.getLogger(__name__)


def report(search: Search, folder: SearchFolder, grid, start_losses: dict, chosen: str | None = None) -> dict:
    """Write results.csv, results.json, objective.png and the best (or `chosen`) trial's stage as
    best-stage.yaml under `folder`; print the table and the verdict."""

    keys = objective_keys(len(search.objectives))
    ended = grid.num_terminated + grid.num_errors
    interrupted = ended < search.config.trials.count
    rows = [trial_row(search, result, keys, interrupted) for result in grid]  # in start order
    best = pick(rows, keys, chosen)
    verdict = verdict_line(rows, keys, best)
    if interrupted:
        verdict = (
            f"the search was interrupted with {ended} of {search.config.trials.count} trials "
            f"ended; run the same command again to resume it. So far: {verdict}"
        )
    write_json(
        folder.results,
        {
            "objectives": search.objectives,
            "start_from": search.start_from,
            "start_losses": start_losses,
            "verdict": verdict,
            "trials": rows,
        },
    )
    write_text(folder.results_csv, to_csv(rows, keys))
    _plot(rows, keys, search.objectives, folder)
    logger.info(format_table(rows, keys, search.objectives))
    logger.info(verdict)
    if best is not None:
        write_text(folder.best_stage, stage_yaml(search, best))
        logger.info(f"best stage: {folder.best_stage}")
    return {"rows": rows, "best": best, "verdict": verdict, "interrupted": interrupted}


def trial_row(search: Search, result, keys: list[str], interrupted: bool) -> dict:
    """One trial: what it tried (as trained), how it ended, and what it measured."""
    metrics, config = result.metrics or {}, result.config
    stage = search.trial_stage(config)
    resolved = search.resolve(stage)
    finished = metrics.get("step") is not None and metrics.get("step") == metrics.get("total_steps")
    status = "failed" if result.error else "finished" if finished else "unfinished" if interrupted else "stopped"
    return {
        "trial": metrics.get("trial_id") or Path(result.path).name,
        "arm": config.get("baseline", "search"),
        "status": status,
        "mixture": resolved.as_json()["mixture"],
        "lr_peak": resolved.lr.peak,
        "warmup": resolved.lr.warmup,
        "decay": resolved.lr.decay,
        "tokens": resolved.tokens,
        **{key: metrics.get(key) for key in keys},
        "loss": metrics.get("loss", {}),
        "forgetting": metrics.get("forgetting", {}),
        "trained_tokens": metrics.get("trained_tokens"),
        "evals": metrics.get("eval", 0),
        # A finished trial measured its own training (Tune's clock restarts when a resumed search replays it).
        "wall_s": metrics.get("wall_s", round(metrics.get("time_total_s", 0.0), 1)),
        "stage": stage,
    }


def pick(rows: list[dict], keys: list[str], chosen: str | None) -> dict | None:
    """The chosen trial, or the finished trial with the lowest (first) objective."""
    if chosen is not None:
        match = [r for r in rows if r["trial"] == chosen]
        if not match:
            raise MixloopError(
                f"no trial {chosen!r} in this search. Fix: use one of {', '.join(r['trial'] for r in rows)}."
            )
        if match[0]["status"] != "finished":
            raise MixloopError(
                f"trial {chosen} {match[0]['status']} before the end of its stage. Fix: choose a finished trial."
            )
        return match[0]
    finished = [r for r in rows if r["status"] == "finished"]
    return min(finished, key=lambda r: r[keys[0]]) if finished else None


def pareto_front(rows: list[dict], keys: list[str]) -> list[dict]:
    """Finished trials that no other finished trial beats on every objective."""
    finished = [r for r in rows if r["status"] == "finished"]

    def dominated(row: dict) -> bool:
        return any(all(o[k] <= row[k] for k in keys) and any(o[k] < row[k] for k in keys) for o in finished)

    return [r for r in finished if not dominated(r)]


def verdict_line(rows: list[dict], keys: list[str], best: dict | None) -> str:
    """Which trial won and by how much over the stratified baseline (the one to beat: arXiv 2411.05735)."""
    stratified = next((r for r in rows if r["arm"] == "stratified" and r["status"] == "finished"), None)
    if best is None:
        return "no trial finished; nothing to compare"
    if len(keys) > 1:
        front = pareto_front(rows, keys)
        on_front = stratified is not None and stratified in front
        members = ", ".join(f"{r['trial']} ({r['arm']})" for r in front)
        return (
            f"Pareto front: {members}; the stratified baseline is "
            f"{'on it' if on_front else 'not on it' if stratified else 'missing (it did not finish)'}"
        )
    key = keys[0]
    if stratified is None:
        return f"best: trial {best['trial']} ({best['arm']}) with objective {best[key]:.4f}; the stratified baseline did not finish"
    if best is stratified:
        return f"the stratified baseline won ({best[key]:.4f}): no other trial beat it"
    margin = stratified[key] - best[key]
    relative = f" ({margin / abs(stratified[key]):.1%})" if stratified[key] else ""
    return (
        f"winner: trial {best['trial']} ({best['arm']}) with objective {best[key]:.4f}, {margin:.4f}{relative} "
        f"below the stratified baseline's {stratified[key]:.4f}"
    )


def describe_changes(changes: dict, config: dict) -> str:
    if "baseline" in config and "mixture" not in changes:
        return "the stage's own settings (baseline)"
    parts = [", ".join(f"{c} {w:g}" for c, w in changes.get("mixture", {}).items())]
    parts += [f"lr {k} {v:g}" if isinstance(v, float) else f"lr {k} {v}" for k, v in changes.get("lr", {}).items()]
    if "tokens" in changes:
        parts.append(f"{changes['tokens']:,} tokens")
    label = f" ({config['baseline']} baseline)" if "baseline" in config else ""
    return "; ".join(p for p in parts if p) + label


def _mixture_text(mixture: dict) -> str:
    return " ".join(
        f"{c}={w['from']:.3f}" if w["from"] == w["to"] else f"{c}={w['from']:.2f}->{w['to']:.2f}"
        for c, w in mixture.items()
    )


def format_table(rows: list[dict], keys: list[str], objectives: list[str]) -> str:
    """Finished trials first, best first."""
    rows = sorted(rows, key=lambda r: (r["status"] != "finished", r[keys[0]] is None, r[keys[0]] or 0.0))
    header = ["trial", "arm", "status", "mixture", "lr_peak", "warmup", "decay", "tokens", *keys, "wall_s"]
    lines = [
        [
            r["trial"],
            r["arm"],
            r["status"],
            _mixture_text(r["mixture"]),
            f"{r['lr_peak']:.2e}",
            f"{r['warmup']:.3f}",
            r["decay"],
            f"{r['tokens']:,}",
            *[f"{r[k]:.4f}" if r[k] is not None else "-" for k in keys],
            f"{r['wall_s']:.0f}",
        ]
        for r in rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    table = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) for line in [header, *lines]]
    legend = [f"{key}: {expression}" for key, expression in zip(keys, objectives)]
    return "\n".join(table + legend)


def to_csv(rows: list[dict], keys: list[str]) -> str:
    corpora = sorted({c for r in rows for c in r["loss"]})
    columns = [
        "trial",
        "arm",
        "status",
        "mixture",
        "lr_peak",
        "warmup",
        "decay",
        "tokens",
        *keys,
        *[f"loss.{c}" for c in corpora],
        *[f"forgetting.{c}" for c in corpora],
        "trained_tokens",
        "evals",
        "wall_s",
    ]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        flat = {
            **row,
            "mixture": _mixture_text(row["mixture"]),
            **{f"loss.{c}": v for c, v in row["loss"].items()},
            **{f"forgetting.{c}": v for c, v in row["forgetting"].items()},
        }
        writer.writerow(flat)
    return out.getvalue()


def _plot(rows: list[dict], keys: list[str], objectives: list[str], folder: SearchFolder) -> None:
    """objective.png: each trial's objective in start order (hollow: stopped early), or the Pareto front."""
    colors = {"current": "tab:orange", "stratified": "tab:green", "search": "tab:blue"}
    figure, axes = plt.subplots(figsize=(7, 4.2))
    measured = [r for r in rows if all(r[k] is not None for k in keys)]
    if len(keys) == 1:
        for index, row in enumerate(measured):
            filled = row["status"] == "finished"
            axes.scatter(
                index,
                row[keys[0]],
                s=50,
                color=colors[row["arm"]],
                facecolors=colors[row["arm"]] if filled else "none",
                label=row["arm"],
            )
        stratified = next((r for r in measured if r["arm"] == "stratified"), None)
        if stratified:
            axes.axhline(stratified[keys[0]], color=colors["stratified"], linestyle="--", linewidth=1)
        axes.set_xlabel("trial (start order; hollow: stopped early)")
        axes.set_ylabel(objectives[0])
    else:
        for row in measured:
            axes.scatter(row[keys[0]], row[keys[1]], s=50, color=colors[row["arm"]], label=row["arm"])
        front = sorted(pareto_front(rows, keys), key=lambda r: r[keys[0]])
        axes.plot([r[keys[0]] for r in front], [r[keys[1]] for r in front], color="black", linewidth=1, label="front")
        axes.set_xlabel(objectives[0])
        axes.set_ylabel(objectives[1])
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes.legend(unique.values(), unique.keys())
    figure.tight_layout()
    with tempfile.TemporaryDirectory() as staging:
        figure.savefig(Path(staging, OBJECTIVE_PLOT), dpi=110)
        upload(staging, folder.root)
    plt.close(figure)


# ---------------------------------------------------------------- the best stage


def stage_note(search: Search, row: dict) -> str:
    """Which search and trial made the stage, with its scores: a comment above it."""
    keys = [k for k in row if re.fullmatch(r"objective(_\d+)?", k) and row[k] is not None]
    scores = ", ".join(f"{k} {row[k]:.4f}" for k in keys)
    return f"tuned by {Path(search.path).name}: trial {row['trial']} ({row['arm']}), {scores}"


def stage_yaml(search: Search, row: dict) -> str:
    """The trial's stage as a YAML list item, ready to go under the pipeline's `stages:`."""
    return f"# {stage_note(search, row)}\n" + yaml.safe_dump([row["stage"]], sort_keys=False)


def append_stage(pipeline_path: Path, stage: dict, note: str) -> None:
    """Append the stage at the end of the pipeline file's `stages:` list, `note` a comment above it, so
    that the file's comments and layout stay; the result must validate before it replaces the file."""
    names = [s.name for s in load_spec(pipeline_path).config.stages]
    if stage["name"] in names:
        raise MixloopError(
            f"{pipeline_path} already has a stage named {stage['name']!r}. Fix: give the search a new "
            "name, or remove that stage first."
        )
    replace_validated(pipeline_path, append_entries(pipeline_path, {"stages": [stage]}, note), "appending the stage")
