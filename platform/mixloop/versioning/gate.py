"""Gates and the `current` version: which version of a workdir is the one to use.

After a run, the pipeline's last version is judged against `current` by the spec's `gate:` (eval
loss on every corpus both were measured on, benchmark scores, chat health). Loss and scores are
measured with standard errors (a bootstrap over eval rows; lm-eval's over questions): a bound fails
only when it is crossed by more than z standard errors of the compared values (z = 1.96 at the
default confidence 0.95), so a gate never passes or fails on noise alone. A version that passes becomes current; one
that fails is kept, its verdict and reasons in its lineage and the report, and current stays. The
first version judged has nothing to compare with and becomes current; without a gate, every run's
last version does.

The alias itself (`current.json`, `models/current`, `current` as a version name) is the registry's.
`promote` and `rollback` are people overriding a verdict: recorded in the alias's history and in the
lineage of the version they make current.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from mixloop.config import GateConfig
from mixloop.errors import MixloopError
from mixloop.evaluation.scores import Score, ScoreMatrix
from mixloop.versioning.lineage import GateVerdict, Lineage, Lineages
from mixloop.versioning.registry import (
    current_state,
    current_version,
    now,
    read_lineage,
    require_lineage,
    set_current,
    write_lineage,
)


def judge(
    gate: GateConfig | None,
    candidate: str,
    against: str | None,
    matrix: dict,
    health: dict,
    lineages: Lineages,
    scores: ScoreMatrix | None = None,
) -> GateVerdict:
    """The verdict on `candidate` against the current version `against`; each check a sentence with the
    measured value, its standard error where measured, and its bound. A bound fails only when it is
    crossed by more than the noise: z standard errors of the compared values (z from gate.confidence)."""
    verdict = GateVerdict(passed=True, against=against, judged=now())
    if against is None or gate is None:
        verdict.checks = ["no current version to compare with" if against is None else "the pipeline has no gate"]
        return verdict
    z = NormalDist().inv_cdf(0.5 + gate.confidence / 2)
    _loss_checks(verdict, gate, z, {v: matrix.get(v) or {} for v in (candidate, against)}, lineages, candidate, against)
    _score_checks(verdict, gate, z, (scores or {}).get(candidate, {}), (scores or {}).get(against, {}))
    _health_checks(verdict, gate, (health.get(candidate) or {}))
    return verdict


def _loss_checks(verdict, gate: GateConfig, z: float, rows: dict, lineages: Lineages, candidate: str, against: str):
    """Forgetting on the corpora the current version trained on; uptake on those it did not."""
    loss = {v: {c: r for c, r in row.items() if r} for v, row in rows.items()}
    known = lineages.trained_corpora(against)
    for corpus in sorted(known & loss[candidate].keys() & loss[against].keys()):
        limit = _bound(gate.max_forgetting, corpus, loss[against][corpus]["loss"])
        if limit is not None:
            rise, stderr = _difference(loss[against][corpus], loss[candidate][corpus], "loss")
            _check(verdict, f"forgetting on {corpus}", rise, stderr, f"at most {limit:.4f}", rise - limit, z)
    for corpus in sorted(lineages.trained_corpora(candidate) - known) if gate.min_uptake is not None else []:
        if corpus not in loss[candidate] or corpus not in loss[against]:
            verdict.check(False, f"uptake on {corpus}: not measured (it has no eval split)")
            continue
        floor = _bound(gate.min_uptake, corpus, loss[against][corpus]["loss"])
        assert floor is not None  # min_uptake is set: one bound for every corpus
        rise, stderr = _difference(loss[against][corpus], loss[candidate][corpus], "loss")
        _check(verdict, f"uptake on {corpus}", -rise, stderr, f"at least {floor:.4f}", floor + rise, z)


def _score_checks(verdict, gate: GateConfig, z: float, mine: dict[str, Score], theirs: dict[str, Score]) -> None:
    """Benchmark floors, and the largest fall of a score against the current version."""
    for task, floor in sorted((gate.min_score or {}).items()):
        if task not in mine:
            verdict.check(False, f"score on {task}: not measured (no such benchmark task or probe)")
            continue
        score = mine[task]
        name = f"score on {task} ({score.metric})"
        _check(verdict, name, score.value, score.stderr, f"at least {floor:.4f}", floor - score.value, z, ".4f")
    for task in sorted(set(mine) & set(theirs)) if gate.max_score_drop is not None else []:
        limit = gate.max_score_drop.get(task) if isinstance(gate.max_score_drop, dict) else gate.max_score_drop
        if limit is not None:
            drop = theirs[task].value - mine[task].value
            stderr = _hypot(theirs[task].stderr, mine[task].stderr)
            name = f"score drop on {task} ({mine[task].metric})"
            _check(verdict, name, drop, stderr, f"at most {limit:.4f}", drop - limit, z)


def _health_checks(verdict, gate: GateConfig, health: dict) -> None:
    for corpus, summary in sorted(health.items()):
        if gate.min_ended is not None:
            verdict.check(
                summary["ended"] >= gate.min_ended,
                f"answers ended on {corpus}: {summary['ended']:.0%} (at least {gate.min_ended:.0%})",
            )
        if gate.max_repetition is not None:
            verdict.check(
                summary["repetition"] <= gate.max_repetition,
                f"repetition on {corpus}: {summary['repetition']:.3f} (at most {gate.max_repetition:.3f})",
            )


def _check(verdict, name: str, value: float, stderr, bound: str, excess: float, z: float, fmt: str = "+.4f"):
    """One check: it fails when the bound is crossed (`excess` > 0) by more than z standard errors; a
    crossing within that noise passes, and the sentence says so with the numbers."""
    noise = z * stderr if stderr is not None else 0.0
    measured = f"{value:{fmt}}" + (f" ± {stderr:.4f}" if stderr is not None else "")
    within = f"; crossed by {excess:.4f}, within the noise ({z:.2f} × {stderr:.4f})" if 0 < excess <= noise else ""
    verdict.check(excess <= noise, f"{name}: {measured} ({bound}{within})")


def _difference(before: dict, after: dict, key: str) -> tuple[float, float | None]:
    """after - before of a measured value, with the standard error of the difference."""
    return after[key] - before[key], _hypot(before.get("stderr"), after.get("stderr"))


def _hypot(a: float | None, b: float | None) -> float | None:
    return math.hypot(a, b) if a is not None and b is not None else None


def gate_summary(lineage: Lineage) -> str:
    """A version's verdict in a few words: "passed against X", "failed against X: reasons", or "-"."""
    return "-" if lineage.gate is None else lineage.gate.summary()


def _bound(setting, corpus: str, reference: float) -> float | None:
    """A gate's bound for one corpus: a number as it is, a share ("5%") of the reference loss."""
    value = setting.get(corpus) if isinstance(setting, dict) else setting
    if value is None:
        return None
    return float(value[:-1]) / 100 * reference if isinstance(value, str) else float(value)


def record(workdir: str, version: str, verdict: GateVerdict) -> Lineage:
    """Keep the verdict in the version's lineage and make the version current if it passed; its lineage."""
    lineage = require_lineage(workdir, version).model_copy(update={"gate": verdict})
    write_lineage(workdir, lineage)
    if verdict.passed:
        against = verdict.against
        set_current(workdir, version, f"passed its gate against {against}" if against else "the first version")
    return lineage


def promote(workdir: str, version: str, reason: str, **details) -> None:
    """Make `version` current by hand."""
    lineage = read_lineage(workdir, version)
    if lineage is None:
        raise MixloopError(f"no version {version!r} in {workdir}. See `mixloop models list`.")
    event = {"promoted": now(), "from": current_version(workdir), "reason": reason}
    write_lineage(workdir, lineage.model_copy(update={"promotions": [*lineage.promotions, event]}))
    set_current(workdir, lineage.version, f"promoted by hand: {reason}", **details)


def rollback(workdir: str, reason: str) -> str:
    """Make the version that was current before the present one current again; its name. A rollback after
    a rollback steps further back, past the entry the first one restored."""
    history = current_state(workdir)["history"]
    present = history[-1] if history else {}
    start = present.get("restores", len(history) - 1)
    earlier = [i for i in range(start) if history[i]["version"] != present.get("version")]
    if not earlier:
        raise MixloopError(
            f"{workdir}: no earlier current version to roll back to. Fix: `mixloop models "
            "promote` the version you want."
        )
    version = history[earlier[-1]]["version"]
    promote(workdir, version, f"rollback from {present['version']}: {reason}", restores=earlier[-1])
    return version
