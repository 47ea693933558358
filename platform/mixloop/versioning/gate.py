"""Gates and the `current` version: which version of a workdir is the one to use.

After a run, the pipeline's last version is judged against `current` by the spec's `gate:` (eval
loss on every corpus both were measured on, chat health). A version that passes becomes current; one
that fails is kept, its verdict and reasons in its lineage and the report, and current stays. The
first version judged has nothing to compare with and becomes current; without a gate, every run's
last version does.

The alias itself (`current.json`, `models/current`, `current` as a version name) is the registry's.
`promote` and `rollback` are people overriding a verdict: recorded in the alias's history and in the
lineage of the version they make current.
"""

from __future__ import annotations

from mixloop.config import GateConfig
from mixloop.errors import MixloopError
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
    gate: GateConfig | None, candidate: str, against: str | None, matrix: dict, health: dict, lineages: Lineages
) -> GateVerdict:
    """The verdict on `candidate` against the current version `against`; each check a sentence with the
    measured value and its bound."""
    verdict = GateVerdict(passed=True, against=against, judged=now())
    if against is None or gate is None:
        verdict.checks = ["no current version to compare with" if against is None else "the pipeline has no gate"]
        return verdict
    loss = {v: {c: r["loss"] for c, r in (matrix.get(v) or {}).items() if r} for v in (candidate, against)}
    known = lineages.trained_corpora(against)
    for corpus in sorted(known & loss[candidate].keys() & loss[against].keys()):
        limit = _bound(gate.max_forgetting, corpus, loss[against][corpus])
        if limit is not None:
            rise = loss[candidate][corpus] - loss[against][corpus]
            verdict.check(rise <= limit, f"forgetting on {corpus}: {rise:+.4f} (at most {limit:.4f})")
    for corpus in sorted(lineages.trained_corpora(candidate) - known) if gate.min_uptake is not None else []:
        if corpus not in loss[candidate] or corpus not in loss[against]:
            verdict.check(False, f"uptake on {corpus}: not measured (it has no eval split)")
            continue
        floor = _bound(gate.min_uptake, corpus, loss[against][corpus])
        fall = loss[against][corpus] - loss[candidate][corpus]
        verdict.check(fall >= floor, f"uptake on {corpus}: {fall:+.4f} (at least {floor:.4f})")
    for corpus, summary in sorted((health.get(candidate) or {}).items()):
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
    return verdict


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
