"""Lineage: the record every version keeps beside its weights (`models/<version>/lineage.json`).

Written when a stage is published (runs.stages), rewritten only to add a gate's verdict or a
promotion (versioning.gate); its weights never change. This module is the only one that turns the
JSON into a `Lineage` and back; what is derived from lineages (the tokens a version was trained on,
its ancestors, the corpora it has seen) are methods of `Lineage` and `Lineages`, so no reader sums or
walks the raw JSON itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mixloop.config import ResolvedStage, Share
from mixloop.storage.fs import read_json, write_json


class GateVerdict(BaseModel):
    """A gate's judgement of a version against the version that was current."""

    model_config = ConfigDict(extra="allow")

    passed: bool
    against: str | None
    checks: list[str] = Field(default_factory=list)
    """Every check as a sentence with the measured value and its bound."""
    failed: list[str] = Field(default_factory=list)
    judged: str | None = None

    def check(self, ok: bool, sentence: str) -> None:
        self.checks.append(sentence)
        if not ok:
            self.failed.append(sentence)
            self.passed = False

    def summary(self) -> str:
        """ "passed against X", "failed against X: reasons"."""
        against = f" against {self.against}" if self.against else ""
        return f"passed{against}" if self.passed else f"failed{against}: " + "; ".join(self.failed)


class VersionMetrics(BaseModel):
    """How a version's stage ended. Besides the fields below, a trained version keeps the values of its
    stage's last metrics line (train.metrics.MetricsRecord: loss, tokens_per_s, ...) as extra keys."""

    model_config = ConfigDict(extra="allow")

    final_lr: float
    """The learning rate of the stage's last step (a `warmup_from: current` child starts there)."""
    steps: int = 0
    wall_seconds: float = 0.0
    """From the previous stage's end (or the group's start) to this stage's end."""
    resumed_from: int | None = None
    """The step of the checkpoint the stage last resumed from, if it was interrupted."""


class Lineage(BaseModel):
    """Where a version came from: its parent, its stage's every setting, what it trained on, how it ended."""

    model_config = ConfigDict(extra="allow")  # keys a newer mixloop wrote survive a rewrite by this one

    version: str
    parent: str | None = None
    stage: ResolvedStage | None = None
    """None for `base`, the starting weights."""
    stage_hash: str
    started: str
    finished: str = ""
    """Set when the version is published (versioning.registry.publish), as is `mixloop_version`."""
    mixloop_version: str = ""
    metrics: VersionMetrics
    tokens_per_corpus: dict[str, float] = Field(default_factory=dict)
    """Tokens trained per corpus, the documents' own (padding excluded)."""
    rows_per_corpus: dict[str, int] = Field(default_factory=dict)
    epochs_per_corpus: dict[str, float] = Field(default_factory=dict)
    data_fingerprints: dict[str, str] = Field(default_factory=dict)
    """The packed folders' names per corpus (their content keys)."""
    overrides: list[str] = Field(default_factory=list)
    weights_sha256: dict[str, str] = Field(default_factory=dict)
    model: dict[str, Any] | None = None
    """base only: the spec's `model` section it was made from."""
    model_commit: str | None = None
    """base only, for a hub model: the snapshot it was copied from."""
    parameters: int | None = None
    gate: GateVerdict | None = None
    promotions: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def trained_tokens(self) -> float:
        """Tokens this version's own stage trained on (its ancestors' not included)."""
        return sum(self.tokens_per_corpus.values())

    @property
    def budget_slots(self) -> int:
        """The token slots its steps trained (steps x batch tokens, padding included); 0 for base."""
        return self.metrics.steps * self.stage.global_batch_tokens if self.stage else 0

    @property
    def corpora(self) -> list[str]:
        """The corpora its stage mixed (none for base)."""
        return list(self.stage.mixture) if self.stage is not None else []

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def load_lineage(path: str) -> Lineage | None:
    """The lineage at `path`, or None when there is none (the version is absent or incomplete)."""
    data = read_json(path)
    return None if data is None else Lineage.model_validate(data)


def save_lineage(path: str, lineage: Lineage) -> None:
    write_json(path, lineage.to_json())


class Lineages(Mapping[str, Lineage]):
    """The lineages of a workdir's versions by name, oldest first, and what is derived from them together."""

    def __init__(self, lineages: list[Lineage]):
        self._by_version = {lineage.version: lineage for lineage in lineages}

    def __getitem__(self, version: str) -> Lineage:
        return self._by_version[version]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_version)

    def __len__(self) -> int:
        return len(self._by_version)

    def with_lineage(self, lineage: Lineage) -> Lineages:
        """The same lineages with one replaced (a verdict just recorded), or added last."""
        return Lineages(list({**self._by_version, lineage.version: lineage}.values()))

    def ancestors(self, version: str | None) -> list[str]:
        """A version and its ancestors, newest first (those known here)."""
        chain = []
        while version is not None and version in self:
            chain.append(version)
            version = self[version].parent
        return chain

    def trained_corpora(self, version: str | None) -> set[str]:
        """Every corpus a version or one of its ancestors trained on."""
        return {corpus for v in self.ancestors(version) for corpus in self[v].corpora}

    def tokens_through(self, version: str | None) -> float:
        """Tokens trained from base up to and including `version`."""
        return sum(self[v].trained_tokens for v in self.ancestors(version))


def mixture_shares(mixture: Mapping[str, Share]) -> str:
    """A stage's mixture in words: `web 70%, chat 30%→50%`, or `-`."""
    return (
        ", ".join(f"{c} {w.start:.0%}" + (f"→{w.end:.0%}" if w.end != w.start else "") for c, w in mixture.items())
        or "-"
    )


# What differs between two versions beyond their timing (which always does).
_COMPARED = ("parent", "stage", "tokens_per_corpus", "rows_per_corpus", "epochs_per_corpus", "metrics")
_VOLATILE = ("metrics.time", "metrics.wall_seconds", "metrics.tokens_per_s", "metrics.step_seconds")


def diff_lineages(a: Lineage, b: Lineage) -> list[tuple[str, object, object]]:
    """(key, value in a, value in b) for every difference in stage, data and metrics."""
    left = _flatten(a.model_dump(mode="json", by_alias=True, include=set(_COMPARED)))
    right = _flatten(b.model_dump(mode="json", by_alias=True, include=set(_COMPARED)))
    return [
        (key, left.get(key), right.get(key))
        for key in sorted(set(left) | set(right))
        if left.get(key) != right.get(key) and not key.startswith(_VOLATILE) and ".row_hashes" not in key
    ]


def _flatten(data: object, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}, for comparing nested records key by key."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
